"""Hyena-family attention replacements (hyena_x, hyena_y, hyena_se, hyena_x2d).

Each operator's defining math against an independent plain-torch computation (explicit shifted
sums, no F.conv) on the Triton path, outputs and gradients, with random filters (not the
identity init); the Triton path against the reference; the identity inits; causality and
locality; low precision against the fp32 math; options; FLOPs by hand and by torch's FLOP
counter; the checkpoint layout of the paper's release.
"""
import pytest
import torch

from graftfx.errors import GraftError
from graftfx.kernels.hyena import MAX_TAPS
from graftfx.kernels.hyena.featurize import causal_conv1d_available
from graftfx.registry import get_operator

from ._support import assert_triton_matches_reference, build, flop_count, region, triton_path

NAMES = ("hyena_x", "hyena_y", "hyena_se", "hyena_x2d")
KERNEL_OPS = ("hyena_x", "hyena_y", "hyena_se")            # those with a Triton core
WIDTH, TOKENS, GRID = 12, 12, (3, 4)


def _region(width=WIDTH, tokens=TOKENS, grid=GRID, out_width=None):
    return region(width, tokens, 4, grid=grid, out_width=out_width)


def _hyena(name, randomize=True, **options):
    """The operator with random filters (the inner filter's identity init would hide taps)."""
    torch.manual_seed(1)
    op = build(name, _region(), **options)
    if randomize:
        with torch.no_grad():
            for conv in (getattr(op, "short_filter", None), getattr(op, "inner_filter", None)):
                if conv is not None:
                    conv.weight.normal_(0, 0.5)
                    conv.bias.normal_(0, 0.2)
    return op


# ----------------------------------------------------------------------------- plain-torch math
def shift_tokens(u, s):
    """u delayed by s tokens along dim 1, zeros in front."""
    if s == 0:
        return u
    return torch.cat([torch.zeros_like(u[:, :s]), u[:, :-s]], dim=1)


def causal_conv_plain(u, conv):
    """Causal depthwise conv from a Conv1d's weights as explicit shifted sums (tap K-1 = now)."""
    w, taps = conv.weight[:, 0, :].double(), conv.weight.shape[-1]
    out = conv.bias.double().expand_as(u).clone()
    for j in range(taps):
        out = out + w[:, j] * shift_tokens(u, taps - 1 - j)
    return out


def linear_plain(x, layer):
    return x.double() @ layer.weight.double().t() + layer.bias.double()


def hyena_plain(op, x):
    """Independent computation of each operator's output, in fp64."""
    u = linear_plain(x, op.in_proj)
    name = op.operator_name
    if name in ("hyena_x", "hyena_se"):
        u = causal_conv_plain(u, op.short_filter)
    elif name == "hyena_x2d":
        (h, w), ks = op.grid, op.config.kernel_size
        b, _, c = u.shape
        pad = ks // 2
        img = torch.nn.functional.pad(u.reshape(b, h, w, c), (0, 0, pad, pad, pad, pad))
        weight = op.short_filter.weight.double()
        out = op.short_filter.bias.double().expand(b, h, w, c).clone()
        for di in range(ks):
            for dj in range(ks):
                out = out + weight[:, 0, di, dj] * img[:, di:di + h, dj:dj + w]
        u = out.reshape(b, h * w, c)
    q, k, v = u.chunk(3, dim=-1)
    z = k * v
    if name in ("hyena_y", "hyena_se"):
        z = causal_conv_plain(z, op.inner_filter)
    return linear_plain(q * z, op.out_proj)


def _path(name):
    return triton_path() if name in KERNEL_OPS else triton_path(expect_launch=False)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", NAMES)
def test_registered_as_attention_replacement(name):
    spec = get_operator(name)
    causal = ("causal_self_attention",) if name != "hyena_x2d" else ()   # causal convs: LLM attention too
    assert spec.kinds == ("self_attention",) + causal and spec.loss == "l1" and spec.description
    assert spec.cls.has_reference() == (name in KERNEL_OPS)


@pytest.mark.parametrize("name", NAMES)
def test_math_matches_plain_torch_on_the_triton_path(name):
    op = _hyena(name)
    params = [p for _, p in op.named_parameters()]
    x = torch.randn(2, TOKENS, WIDTH, requires_grad=True)
    with _path(name):
        y = op(x)
        cot = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *params], cot)
    want_y = hyena_plain(op, x)
    want = torch.autograd.grad(want_y, [x, *params], cot.double())
    torch.testing.assert_close(y.double(), want_y, atol=1e-5, rtol=1e-4)
    names = ["x"] + [n for n, _ in op.named_parameters()]
    for pname, g, w in zip(names, got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-4, msg=lambda m, n=pname: f"d{n}: {m}")


@pytest.mark.parametrize("name", KERNEL_OPS)
def test_triton_path_matches_reference(name):
    assert_triton_matches_reference(_hyena(name), torch.randn(3, TOKENS, WIDTH))


@pytest.mark.parametrize("name", ["hyena_y", "hyena_se"])
def test_inner_filter_starts_as_the_identity(name):
    op = _hyena(name, randomize=False)
    w = op.inner_filter.weight[:, 0]
    assert torch.equal(w[:, -1], torch.ones(WIDTH)) and not w[:, :-1].any() and not op.inner_filter.bias.any()
    if name == "hyena_y":                               # so Hyena-Y starts as q * (k * v)
        x = torch.randn(2, TOKENS, WIDTH)
        q, k, v = linear_plain(x, op.in_proj).chunk(3, dim=-1)
        with torch.no_grad(), triton_path():
            y = op(x)
        torch.testing.assert_close(y.double(), linear_plain(q * (k * v), op.out_proj), atol=1e-5, rtol=1e-4)


def test_hyena_se_with_identity_featurizer_is_hyena_y():
    se, y = _hyena("hyena_se"), _hyena("hyena_y")
    with torch.no_grad():
        for name in ("in_proj", "out_proj", "inner_filter"):
            getattr(se, name).load_state_dict(getattr(y, name).state_dict())
        se.short_filter.weight.zero_()
        se.short_filter.weight[:, 0, -1] = 1.0
        se.short_filter.bias.zero_()
    x = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad(), triton_path():
        torch.testing.assert_close(se(x), y(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", KERNEL_OPS)
def test_causal_in_raster_order(name):
    op, t0 = _hyena(name), 7
    x = torch.randn(2, TOKENS, WIDTH)
    x2 = x.clone()
    x2[:, t0:] += torch.randn_like(x2[:, t0:])
    with torch.no_grad(), triton_path():
        y, y2 = op(x), op(x2)
    torch.testing.assert_close(y[:, :t0], y2[:, :t0], rtol=0, atol=0)
    assert (y[:, t0:] - y2[:, t0:]).abs().amax(dim=(0, 2)).min() > 1e-4     # every later token


def test_hyena_x2d_is_local_on_the_grid():
    op = _hyena("hyena_x2d")
    x = torch.randn(1, TOKENS, WIDTH)
    x2 = x.clone()
    i, j = 1, 2
    x2[:, i * GRID[1] + j] += 1.0
    with torch.no_grad():
        changed = ((op(x) - op(x2)).abs().amax(dim=(0, 2)) > 0).reshape(GRID)
    expect = torch.zeros(GRID, dtype=torch.bool)
    expect[i - 1:i + 2, j - 1:j + 2] = True
    assert torch.equal(changed, expect)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_against_the_fp32_math(name, dtype):
    op = _hyena(name)
    x = torch.randn(2, TOKENS, WIDTH)
    want = hyena_plain(op, x)
    low = op.to(dtype)
    xl = x.to(dtype).requires_grad_()
    with _path(name):
        y = low(xl)
        y.float().square().mean().backward()
    assert y.dtype == dtype
    err = (y.double() - want).norm() / want.norm()
    assert err < 3e-2, err
    assert torch.isfinite(xl.grad).all() and xl.grad.abs().sum() > 0
    for pname, p in low.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_fp32_module_takes_half_inputs():
    op = _hyena("hyena_x")
    x = torch.randn(2, TOKENS, WIDTH, dtype=torch.bfloat16)
    with torch.no_grad(), triton_path():
        y, full = op(x), op(x.float())
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, full.to(torch.bfloat16))            # computed in fp32, cast back


@pytest.mark.parametrize("name,options,option", [
    ("hyena_x", {"conv_len": 0}, "conv_len"),
    ("hyena_x", {"conv_len": MAX_TAPS + 1}, "conv_len"),
    ("hyena_x", {"conv_len": True}, "conv_len"),
    ("hyena_x", {"conv_backend": "cuda"}, "conv_backend"),
    ("hyena_x", {"conv_backend": "causal_conv1d", "conv_len": 6}, "conv_backend"),
    ("hyena_y", {"inner_len": 0}, "inner_len"),
    ("hyena_se", {"inner_len": "4"}, "inner_len"),
    ("hyena_se", {"conv_len": -1}, "conv_len"),
    ("hyena_x2d", {"kernel_size": 2}, "kernel_size"),
    ("hyena_x2d", {"kernel_size": 0}, "kernel_size"),
])
def test_invalid_options_name_the_option(name, options, option):
    spec = get_operator(name)
    with pytest.raises(ValueError, match=option):
        spec.config(**options)
    with pytest.raises(GraftError, match=option):          # what a rule file's options meet
        spec.make_config(options, where="rule.toml: ")


def test_unknown_option_is_rejected():
    with pytest.raises(GraftError, match="unknown option 'inner_len'"):
        get_operator("hyena_x").make_config({"inner_len": 4})


@pytest.mark.skipif(causal_conv1d_available(), reason="causal_conv1d is installed here")
@pytest.mark.parametrize("name", ["hyena_x", "hyena_se"])
def test_causal_conv1d_backend_absent_is_an_error_not_a_silent_switch(name):
    op = build(name, _region(), conv_backend="causal_conv1d")
    with pytest.raises(ValueError, match="causal_conv1d"):
        op(torch.randn(1, TOKENS, WIDTH))


def test_hyena_x2d_grid():
    assert build("hyena_x2d", _region(tokens=16, grid=None)).grid is None       # square: 4 x 4
    with pytest.raises(ValueError, match="15 tokens is not a square"):
        build("hyena_x2d", _region(tokens=15, grid=None))
    op = build("hyena_x2d", _region())
    with pytest.raises(ValueError, match="3x4"):
        op(torch.randn(1, 9, WIDTH))


def test_input_width_is_checked():
    with pytest.raises(ValueError, match="expects x of shape"):
        build("hyena_x", _region())(torch.randn(1, TOKENS, WIDTH + 1))


def test_out_width_and_options_are_used():
    torch.manual_seed(1)
    op = build("hyena_se", _region(out_width=10), conv_len=3, inner_len=2)
    assert op.short_filter.weight.shape == (3 * WIDTH, 1, 3)
    assert op.inner_filter.weight.shape == (WIDTH, 1, 2)
    x = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad(), triton_path():
        y = op(x)
    assert y.shape == (2, TOKENS, 10)
    torch.testing.assert_close(y.double(), hyena_plain(op, x), atol=1e-5, rtol=1e-4)


def test_flops_by_hand_on_a_tiny_shape():
    r = region(2, 3, None, grid=(1, 3))
    # width 2, L = 3: in_proj 2*3*2*6 = 72, out_proj 2*3*2*2 = 24 (every operator)
    # featurizer conv over 3d = 6 channels, 2 taps: 2*3*6*2 = 72
    assert build("hyena_x", r, conv_len=2).flops(3) == 72 + 24 + 72
    # inner conv over d = 2 channels, 3 taps: 2*3*2*3 = 36
    assert build("hyena_y", r, inner_len=3).flops(3) == 72 + 24 + 36
    assert build("hyena_se", r, conv_len=2, inner_len=3).flops(3) == 72 + 24 + 72 + 36
    # 3 x 3 conv over 6 channels, all 9 taps counted (as torch does): 2*3*6*9 = 324
    assert build("hyena_x2d", r, kernel_size=3).flops(3) == 72 + 24 + 324


def test_hyena_x2d_flops_equal_the_flop_counter():
    """Its core is plain torch (two linears and a conv2d), all of which torch counts."""
    op = _hyena("hyena_x2d", kernel_size=3)
    assert op.flops(TOKENS) == flop_count(op, torch.randn(1, TOKENS, WIDTH))


@pytest.mark.parametrize("name,keys", [
    ("hyena_x", {"short_filter"}), ("hyena_y", {"inner_filter"}),
    ("hyena_se", {"short_filter", "inner_filter"}), ("hyena_x2d", {"short_filter"}),
])
def test_checkpoint_keys_follow_the_release(name, keys):
    expected = {f"{m}.{p}" for m in {"in_proj", "out_proj"} | keys for p in ("weight", "bias")}
    op = build(name, _region())
    assert set(op.state_dict()) == expected
    if name != "hyena_x2d":
        for m in keys:
            assert getattr(op, m).weight.shape[1] == 1          # Conv1d depthwise layout (C, 1, K)
