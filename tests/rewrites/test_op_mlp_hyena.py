"""MLP Hyena-X (mlp_hyena_x): the convolutional MLP replacement.

The defining math (per-token causal conv along the concatenated 3*r*d features, q * (k * v))
against an independent plain-torch computation on the Triton path, outputs and gradients; the
Triton path against the reference; no mixing across tokens; low precision against the fp32
math; options; FLOPs by hand; the release's key layout.
"""
import pytest
import torch

from graftfx.errors import GraftError
from graftfx.kernels.hyena import MAX_TAPS
from graftfx.registry import get_operator

from ._support import assert_triton_matches_reference, build, region, triton_path

WIDTH, TOKENS = 8, 6


def _region(width=WIDTH, tokens=TOKENS, out_width=None):
    return region(width, tokens, None, kind="mlp", out_width=out_width, hidden=4 * width, activation="gelu_tanh")


def _op(**options):
    torch.manual_seed(1)
    return build("mlp_hyena_x", _region(), **options)


def mlp_hyena_plain(op, x):
    """Independent computation in fp64: explicit shifted sums along the concatenated features."""
    u = x.double() @ op.in_proj.weight.double().t() + op.in_proj.bias.double()     # (B, L, 3h)
    w = op.short_filter.weight[:, 0, :].double()                                   # (L, K)
    taps = w.shape[1]
    c = op.short_filter.bias.double()[:, None].expand_as(u[0])
    for j in range(taps):
        s = taps - 1 - j                                    # tap j reads feature f - s
        shifted = torch.cat([torch.zeros_like(u[..., :s]), u[..., :u.shape[-1] - s]], dim=-1)
        c = c + w[:, j:j + 1] * shifted
    q, k, v = c.chunk(3, dim=-1)
    return (q * (k * v)) @ op.out_proj.weight.double().t() + op.out_proj.bias.double()


def test_registered_as_mlp_replacement():
    spec = get_operator("mlp_hyena_x")
    assert spec.kinds == ("mlp",) and spec.loss == "l2" and spec.description
    assert spec.option_names() == ["ratio", "conv_len"]


def test_default_shapes_follow_the_paper():
    op = _op()
    assert op.hidden == 2 * WIDTH
    assert op.in_proj.weight.shape == (3 * 2 * WIDTH, WIDTH)
    assert op.short_filter.weight.shape == (TOKENS, 1, 4)
    assert op.out_proj.weight.shape == (WIDTH, 2 * WIDTH)
    expected = {f"{m}.{p}" for m in ("in_proj", "short_filter", "out_proj") for p in ("weight", "bias")}
    assert set(op.state_dict()) == expected


@pytest.mark.parametrize("options", [{}, {"ratio": 1, "conv_len": 3}], ids=["r2-K4", "r1-K3"])
def test_triton_path_is_the_math(options):
    op = _op(**options)
    names, params = zip(*op.named_parameters())
    x = torch.randn(2, TOKENS, WIDTH, requires_grad=True)
    with triton_path():
        y = op(x)
        cot = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *params], cot)
    want_y = mlp_hyena_plain(op, x)
    want = torch.autograd.grad(want_y, [x, *params], cot.double())
    torch.testing.assert_close(y.double(), want_y, atol=1e-5, rtol=1e-4)
    for name, g, w in zip(("x", *names), got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def test_triton_path_matches_reference():
    assert_triton_matches_reference(_op(), torch.randn(3, TOKENS, WIDTH))


def test_conv_crosses_from_q_into_k():
    """The conv runs over the concatenated features: k's first features read q's last ones."""
    op = _op()
    h = op.hidden
    with torch.no_grad():
        op.in_proj.weight.zero_()                      # u = bias: q = 1, k = 0, v = 1
        op.in_proj.bias.copy_(torch.cat([torch.ones(h), torch.zeros(h), torch.ones(h)]))
        op.short_filter.weight.zero_()
        op.short_filter.weight[:, 0, 0] = 1.0          # c[f] = u[f] + u[f - 3]
        op.short_filter.weight[:, 0, 3] = 1.0
        op.short_filter.bias.zero_()
        op.out_proj.weight.copy_(torch.eye(WIDTH, h))  # read y's first WIDTH features
        op.out_proj.bias.zero_()
        with triton_path():
            y = op(torch.randn(2, TOKENS, WIDTH))
    # k's features 0..2 are q's last three (1 each); every other k feature is 0.
    expected = torch.zeros(WIDTH)
    expected[:3] = 1.0
    torch.testing.assert_close(y, expected.expand_as(y))


def test_tokens_do_not_mix():
    op, t0 = _op(), 4
    x = torch.randn(2, TOKENS, WIDTH)
    x2 = x.clone()
    x2[:, t0] += 1.0
    with torch.no_grad(), triton_path():
        changed = (op(x) - op(x2)).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [t0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_against_the_fp32_math(dtype):
    op = _op()
    x = torch.randn(2, TOKENS, WIDTH)
    want = mlp_hyena_plain(op, x)
    low = op.to(dtype)
    xl = x.to(dtype).requires_grad_()
    with triton_path():
        y = low(xl)
        y.float().square().mean().backward()
    assert y.dtype == dtype
    err = (y.double() - want).norm() / want.norm()
    assert err < 3e-2, err
    for name, p in low.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("options,option", [
    ({"ratio": 0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"ratio": True}, "ratio"),
    ({"conv_len": 0}, "conv_len"), ({"conv_len": MAX_TAPS + 1}, "conv_len"),
])
def test_invalid_options_name_the_option(options, option):
    spec = get_operator("mlp_hyena_x")
    with pytest.raises(ValueError, match=option):
        spec.config(**options)
    with pytest.raises(GraftError, match=option):
        spec.make_config(options, where="rule.toml: ")


def test_filter_longer_than_hidden_width():
    with pytest.raises(ValueError, match="conv_len=4 is longer than the hidden width 1"):
        build("mlp_hyena_x", _region(width=1), ratio=1, conv_len=4)


def test_needs_the_token_count():
    with pytest.raises(ValueError, match="token count"):
        build("mlp_hyena_x", _region(tokens=None))
    with pytest.raises(ValueError, match="rebuild"):
        _op()(torch.randn(2, TOKENS + 1, WIDTH))


def test_out_width():
    op = build("mlp_hyena_x", _region(out_width=7))
    x = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad():
        y = op.reference()(x)
    assert y.shape == (2, TOKENS, 7)
    torch.testing.assert_close(y.double(), mlp_hyena_plain(op, x), atol=1e-5, rtol=1e-4)


def test_flops_by_hand_on_a_tiny_shape():
    op = build("mlp_hyena_x", region(2, 3, None, kind="mlp", out_width=5), ratio=1, conv_len=2)
    # width 2, ratio 1 (hidden 2), L = 3: in_proj 2 -> 6: 2*3*2*6 = 72; out_proj 2 -> 5: 2*3*2*5 = 60;
    # the feature-axis conv, 2 taps over the 6 features of each of the 3 tokens: 2*3*6*2 = 72
    assert op.flops(3) == 72 + 60 + 72 == 204
