"""MLP Hyena-X (mlp_hyena_x): the convolutional MLP replacement.

Built through the registry from a hand-made MLP region; forward/backward at batch 1 and 3 in
fp32/bf16/fp16; the defining math (per-token causal conv along the concatenated 3*r*d features,
q * (k * v)) against an independent plain-torch computation; no mixing across tokens; the
Triton path (interpreter) equal to the reference path; option validation; FLOPs; key layout.
"""
import pytest
import torch

from graftfx.errors import GraftError
from graftfx.kernels import _dispatch
from graftfx.kernels.hyena import MAX_TAPS
from graftfx.match.region import Region
from graftfx.registry import get_operator

WIDTH, TOKENS = 12, 16


def region(width=WIDTH, tokens=TOKENS, out_width=None):
    return Region(path="blocks.1.mlp", kind="mlp", pattern="mlp", input=None, output=None,
                  nodes=(), width=width, out_width=out_width or width, tokens=tokens,
                  grid=(4, 4), hidden=4 * width, activation="gelu_tanh")


def build(**options):
    torch.manual_seed(1)
    return get_operator("mlp_hyena_x").cls.from_region(region(), **options)


def mlp_hyena_plain(op, x):
    """Independent computation: explicit shifted sums along the concatenated feature axis."""
    u = x.float() @ op.in_proj.weight.float().t() + op.in_proj.bias.float()     # (B, L, 3h)
    w = op.short_filter.weight[:, 0, :].float()                                 # (L, K)
    taps = w.shape[1]
    c = op.short_filter.bias.float()[:, None].expand_as(u[0]).clone()
    for j in range(taps):
        s = taps - 1 - j                                    # tap j reads feature f - s
        shifted = torch.cat([torch.zeros_like(u[..., :s]), u[..., :u.shape[-1] - s]], dim=-1)
        c = c + w[:, j:j + 1] * shifted
    q, k, v = c.chunk(3, dim=-1)
    return (q * (k * v)) @ op.out_proj.weight.float().t() + op.out_proj.bias.float()


def test_registered_as_mlp_replacement():
    spec = get_operator("mlp_hyena_x")
    assert spec.kinds == ("mlp",) and spec.loss == "l2" and spec.description


def test_default_shapes_follow_the_paper():
    op = build()
    assert op.hidden == 2 * WIDTH
    assert op.in_proj.weight.shape == (3 * 2 * WIDTH, WIDTH)
    assert op.short_filter.weight.shape == (TOKENS, 1, 4)
    assert op.out_proj.weight.shape == (WIDTH, 2 * WIDTH)
    expected = {f"{m}.{p}" for m in ("in_proj", "short_filter", "out_proj")
                for p in ("weight", "bias")}
    assert set(op.state_dict()) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("batch", [1, 3], ids=["B1", "B3"])
def test_forward_backward_shapes_and_grads(batch, dtype):
    op = build().to(dtype)
    x = torch.randn(batch, TOKENS, WIDTH, dtype=dtype, requires_grad=True)
    y = op(x)
    assert y.shape == (batch, TOKENS, WIDTH) and y.dtype == dtype
    assert torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in op.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("options", [{}, {"ratio": 1, "conv_len": 3}], ids=["r2-K4", "r1-K3"])
def test_math_matches_plain_torch(options):
    op = build(**options)
    x = torch.randn(3, TOKENS, WIDTH)
    torch.testing.assert_close(op(x), mlp_hyena_plain(op, x), atol=1e-5, rtol=1e-4)


def test_conv_crosses_from_q_into_k():
    """The conv runs over the concatenated features: k's first features read q's last ones."""
    op = build()
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
    y = op(torch.randn(2, TOKENS, WIDTH))
    # k's features 0..2 are q's last three (1 each); every other k feature is 0.
    expected = torch.zeros(WIDTH)
    expected[:3] = 1.0
    torch.testing.assert_close(y, expected.expand_as(y))


def test_tokens_do_not_mix():
    op, t0 = build(), 5
    x = torch.randn(2, TOKENS, WIDTH)
    x2 = x.clone()
    x2[:, t0] += 1.0
    changed = (op(x) - op(x2)).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [t0]


def test_triton_path_matches_reference_path():
    op = build()
    x = torch.randn(3, TOKENS, WIDTH, requires_grad=True)
    out = {}
    for mode in ("reference", "triton"):
        with _dispatch.kernels(mode):
            y = op(x)
            out[mode] = (y, *torch.autograd.grad(y.square().sum(), [x, *op.parameters()]))
    for got, ref in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options,option", [
    ({"ratio": 0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"ratio": True}, "ratio"),
    ({"conv_len": 0}, "conv_len"), ({"conv_len": MAX_TAPS + 1}, "conv_len"),
])
def test_invalid_options_name_the_option(options, option):
    spec = get_operator("mlp_hyena_x")
    with pytest.raises(ValueError, match=option):
        spec.cls.from_region(region(), **options)
    with pytest.raises(GraftError, match=option):
        spec.make_config(options, where="rule.toml: ")


def test_filter_longer_than_hidden_width():
    with pytest.raises(ValueError, match="conv_len"):
        get_operator("mlp_hyena_x").cls.from_region(region(width=1), ratio=1, conv_len=4)


def test_needs_the_token_count():
    with pytest.raises(ValueError, match="token count"):
        get_operator("mlp_hyena_x").cls.from_region(region(tokens=None))
    op = build()
    with pytest.raises(ValueError, match="rebuild"):
        op(torch.randn(2, TOKENS + 1, WIDTH))


def test_out_width_and_flops():
    op = get_operator("mlp_hyena_x").cls.from_region(region(out_width=7))
    assert op(torch.randn(2, TOKENS, WIDTH)).shape == (2, TOKENS, 7)
    d, h, L = WIDTH, 2 * WIDTH, TOKENS
    assert op.flops(L) == 2 * L * d * 3 * h + 2 * L * h * 7 + 2 * L * 3 * h * 4
