"""Hyena-family attention replacements (hyena_x, hyena_y, hyena_se, hyena_x2d).

Built through the registry from hand-made regions; forward/backward at batch 1 and 3 in
fp32/bf16/fp16; each operator's defining math against an independent plain-torch computation
(explicit shifted sums, no F.conv); causality / locality; the Triton path (interpreter) equal
to the reference path; option validation; FLOPs; checkpoint key layout.
"""
import pytest
import torch

from graftfx.errors import GraftError
from graftfx.kernels import _dispatch
from graftfx.kernels.hyena import MAX_TAPS
from graftfx.match.region import Region
from graftfx.registry import get_operator

NAMES = ("hyena_x", "hyena_y", "hyena_se", "hyena_x2d")
WIDTH, TOKENS, GRID = 24, 16, (4, 4)


def region(width=WIDTH, tokens=TOKENS, grid=GRID, out_width=None):
    return Region(path="blocks.1.attn", kind="self_attention", pattern="self_attention",
                  input=None, output=None, nodes=(), width=width, out_width=out_width or width,
                  tokens=tokens, grid=grid, heads=4)


def build(name, **options):
    torch.manual_seed(1)
    return get_operator(name).cls.from_region(region(), **options)


# ----------------------------------------------------------------------------- plain-torch math
def shift_tokens(u, s):
    """u delayed by s tokens along dim 1, zeros in front."""
    if s == 0:
        return u
    return torch.cat([torch.zeros_like(u[:, :s]), u[:, :-s]], dim=1)


def causal_conv_plain(u, conv):
    """Causal depthwise conv from a Conv1d's weights as explicit shifted sums (tap K-1 = now)."""
    w, taps = conv.weight[:, 0, :].float(), conv.weight.shape[-1]
    out = conv.bias.float().expand_as(u).clone()
    for j in range(taps):
        out = out + w[:, j] * shift_tokens(u, taps - 1 - j)
    return out


def linear_plain(x, layer):
    return x.float() @ layer.weight.float().t() + layer.bias.float()


def hyena_plain(op, x):
    """Independent computation of each operator's output."""
    u = linear_plain(x, op.in_proj)
    name = op.operator_name
    if name in ("hyena_x", "hyena_se"):
        u = causal_conv_plain(u, op.short_filter)
    elif name == "hyena_x2d":
        (h, w), ks = op.grid, op.config.kernel_size
        b, _, c = u.shape
        pad = ks // 2
        img = torch.nn.functional.pad(u.reshape(b, h, w, c), (0, 0, pad, pad, pad, pad))
        weight = op.short_filter.weight.float()
        out = op.short_filter.bias.float().expand(b, h, w, c).clone()
        for di in range(ks):
            for dj in range(ks):
                out = out + weight[:, 0, di, dj] * img[:, di:di + h, dj:dj + w]
        u = out.reshape(b, h * w, c)
    q, k, v = u.chunk(3, dim=-1)
    z = k * v
    if name in ("hyena_y", "hyena_se"):
        z = causal_conv_plain(z, op.inner_filter)
    return linear_plain(q * z, op.out_proj)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", NAMES)
def test_registered_as_attention_replacement(name):
    spec = get_operator(name)
    assert spec.kinds == ("self_attention",) and spec.loss == "l1" and spec.description


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("batch", [1, 3], ids=["B1", "B3"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_shapes_and_grads(name, batch, dtype):
    op = build(name).to(dtype)
    x = torch.randn(batch, TOKENS, WIDTH, dtype=dtype, requires_grad=True)
    y = op(x)
    assert y.shape == (batch, TOKENS, WIDTH) and y.dtype == dtype
    assert torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in op.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient in {pname}"


def test_fp32_module_takes_half_inputs():
    op = build("hyena_x")
    x = torch.randn(2, TOKENS, WIDTH, dtype=torch.bfloat16)
    y = op(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, op(x.float()).to(torch.bfloat16))     # computed in fp32, cast back


@pytest.mark.parametrize("name", NAMES)
def test_math_matches_plain_torch(name):
    op = build(name)
    with torch.no_grad():                  # leave the identity init: test the general case
        for conv in (getattr(op, "inner_filter", None),):
            if conv is not None:
                conv.weight.normal_(0, 0.5)
                conv.bias.normal_(0, 0.1)
    x = torch.randn(3, TOKENS, WIDTH)
    torch.testing.assert_close(op(x), hyena_plain(op, x), atol=1e-5, rtol=1e-4)


def test_hyena_y_is_q_times_kv_at_init():
    op = build("hyena_y")
    w = op.inner_filter.weight[:, 0]
    assert torch.equal(w[:, -1], torch.ones(WIDTH)) and w[:, :-1].abs().sum() == 0
    assert op.inner_filter.bias.abs().sum() == 0
    x = torch.randn(3, TOKENS, WIDTH)
    q, k, v = linear_plain(x, op.in_proj).chunk(3, dim=-1)
    torch.testing.assert_close(op(x), linear_plain(q * (k * v), op.out_proj), atol=1e-5, rtol=1e-4)


def test_hyena_se_with_identity_featurizer_is_hyena_y():
    se, y = build("hyena_se"), build("hyena_y")
    with torch.no_grad():
        for name in ("in_proj", "out_proj", "inner_filter"):
            getattr(se, name).load_state_dict(getattr(y, name).state_dict())
        se.inner_filter.weight.normal_(0, 0.5)
        y.inner_filter.weight.copy_(se.inner_filter.weight)
        se.short_filter.weight.zero_()
        se.short_filter.weight[:, 0, -1] = 1.0
        se.short_filter.bias.zero_()
    x = torch.randn(2, TOKENS, WIDTH)
    torch.testing.assert_close(se(x), y(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["hyena_x", "hyena_y", "hyena_se"])
def test_causal_in_raster_order(name):
    op, t0 = build(name), 9
    x = torch.randn(2, TOKENS, WIDTH)
    x2 = x.clone()
    x2[:, t0:] += torch.randn_like(x2[:, t0:])
    y, y2 = op(x), op(x2)
    torch.testing.assert_close(y[:, :t0], y2[:, :t0])
    assert (y[:, t0:] - y2[:, t0:]).abs().max() > 1e-3


def test_hyena_x2d_is_local_on_the_grid():
    op = build("hyena_x2d")
    x = torch.randn(1, TOKENS, WIDTH)
    x2 = x.clone()
    i, j = 1, 2
    x2[:, i * GRID[1] + j] += 1.0
    changed = ((op(x) - op(x2)).abs().amax(dim=(0, 2)) > 0).reshape(GRID)
    expect = torch.zeros(GRID, dtype=torch.bool)
    expect[i - 1:i + 2, j - 1:j + 2] = True
    assert torch.equal(changed, expect)


@pytest.mark.parametrize("name", ["hyena_x", "hyena_y", "hyena_se"])
def test_triton_path_matches_reference_path(name):
    """Under the interpreter the operator's custom ops take their Triton kernels."""
    op = build(name)
    x = torch.randn(2, TOKENS, WIDTH, requires_grad=True)
    grads = {}
    for mode in ("reference", "triton"):
        with _dispatch.kernels(mode):
            y = op(x)
            grads[mode] = (y, *torch.autograd.grad(y.square().sum(), [x, *op.parameters()]))
    for got, ref in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


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
    with pytest.raises(ValueError, match=option):
        spec.cls.from_region(region(), **options)
    with pytest.raises(GraftError, match=option):          # what a rule file's options meet
        spec.make_config(options, where="rule.toml: ")


def test_unknown_option_is_rejected():
    with pytest.raises(GraftError, match="unknown option 'inner_len'"):
        get_operator("hyena_x").make_config({"inner_len": 4})


def test_hyena_x2d_grid():
    spec = get_operator("hyena_x2d")
    assert spec.cls.from_region(region(grid=None)).grid == (4, 4)      # square token count
    with pytest.raises(ValueError, match="grid"):
        spec.cls.from_region(region(tokens=15, grid=None))
    op = spec.cls.from_region(region())
    with pytest.raises(ValueError, match="4x4"):
        op(torch.randn(1, 9, WIDTH))


def test_input_width_is_checked():
    with pytest.raises(ValueError, match="expects x of shape"):
        build("hyena_x")(torch.randn(1, TOKENS, WIDTH + 1))


def test_out_width_and_options_are_used():
    op = get_operator("hyena_se").cls.from_region(region(out_width=10), conv_len=3, inner_len=2)
    assert op.short_filter.weight.shape == (3 * WIDTH, 1, 3)
    assert op.inner_filter.weight.shape == (WIDTH, 1, 2)
    assert op(torch.randn(2, TOKENS, WIDTH)).shape == (2, TOKENS, 10)


@pytest.mark.parametrize("name,conv", [("hyena_x", 3 * WIDTH * 4), ("hyena_y", WIDTH * 4),
                                       ("hyena_se", 3 * WIDTH * 4 + WIDTH * 4),
                                       ("hyena_x2d", 3 * WIDTH * 9)])
def test_flops(name, conv):
    d, L = WIDTH, 256
    assert build(name).flops(L) == 2 * L * d * 3 * d + 2 * L * d * d + 2 * L * conv


@pytest.mark.parametrize("name,keys", [
    ("hyena_x", {"short_filter"}), ("hyena_y", {"inner_filter"}),
    ("hyena_se", {"short_filter", "inner_filter"}), ("hyena_x2d", {"short_filter"}),
])
def test_checkpoint_keys_follow_the_release(name, keys):
    expected = {f"{m}.{p}" for m in {"in_proj", "out_proj"} | keys for p in ("weight", "bias")}
    op = build(name)
    assert set(op.state_dict()) == expected
    if name != "hyena_x2d":
        for m in keys:
            conv = getattr(op, m)
            assert conv.weight.shape[1] == 1          # Conv1d depthwise layout (C, 1, K)
