"""The shared attention base (graftfx.operator.AttentionOperator) through its operators.

init="copy" from regions the built-in pattern matched in real attention modules (DiT's own,
q/k norms over the head dim and over the width, non-default softmax scales, an explicit
softmax, cross-attention with a context of another width, an output width of its own):
``mha`` reproduces the original exactly; ``swa`` with a window >= L and ``nat2d`` with a kernel
covering the grid reproduce it on the Triton path; ``linear_attention`` computes the linear
attention of the original's own q, k, v. Then the heads option, heads mismatches, out_width.
"""
import pytest
import torch
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.models.dit import Attention
from graftfx.rules import Rule
from graftfx.splice.splice import build_operator

from ._support import (CrossAttention, SelfAttention, build, dit_qkv_heads, merge_heads, region,
                       traced_region, triton_path)

WIDTH, HEADS, TOKENS, GRID = 16, 2, 9, (3, 3)

ORIGINALS = {
    "dit": lambda: Attention(WIDTH, HEADS),
    "ln-head": lambda: SelfAttention(WIDTH, HEADS, norm="layer_norm", over="head"),
    "rms-head-scale": lambda: SelfAttention(WIDTH, HEADS, norm="rms_norm", over="head", scale=0.6),
    "ln-width-explicit-scale": lambda: SelfAttention(WIDTH, HEADS, norm="layer_norm", over="width",
                                                     scale=0.2, explicit=True),
    "rms-width": lambda: SelfAttention(WIDTH, HEADS, norm="rms_norm", over="width"),
    "scale-out12": lambda: SelfAttention(WIDTH, HEADS, scale=1.3, out_width=12),
}


def _original(name):
    torch.manual_seed(3)
    module = ORIGINALS[name]().eval()
    x = torch.randn(2, TOKENS, WIDTH)
    return module, traced_region(module, x, grid=GRID), x


def _qkv_heads(module, x):
    return dit_qkv_heads(module, x) if isinstance(module, Attention) else module.qkv_heads(x)


def test_the_pattern_records_norms_and_scales():
    """What the copy relies on (so a copy test below cannot pass for lack of a norm or scale)."""
    _, r, _ = _original("rms-head-scale")
    assert r.details["q_norm"]["kind"] == r.details["k_norm"]["kind"] == "rms_norm"
    assert r.details["scale"] == pytest.approx(0.6) and r.weights["q_norm.weight"].shape == (8,)
    _, r, _ = _original("ln-width-explicit-scale")
    assert r.details["scale"] == pytest.approx(0.2) and r.weights["k_norm.bias"].shape == (16,)
    _, r, _ = _original("dit")
    assert not r.details["q_norm"] and r.details["scale"] == pytest.approx(8 ** -0.5)


@pytest.mark.parametrize("name", ORIGINALS)
def test_mha_copy_is_the_original_exactly(name):
    module, r, x = _original(name)
    op = build("mha", r)
    assert op.heads == HEADS and op.proj.out_features == r.out_width
    assert (op.scale is None) == (r.details["scale"] == pytest.approx(8 ** -0.5))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, want = op(xa), module(xb)
    exact = not getattr(module, "explicit", False)              # sdpa in both: bit for bit
    torch.testing.assert_close(y, want, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
    cot = torch.randn_like(y)
    (gx,), (wx,) = torch.autograd.grad(y, [xa], cot), torch.autograd.grad(want, [xb], cot)
    torch.testing.assert_close(gx, wx, rtol=1e-6, atol=1e-7)


def test_mha_copy_of_cross_attention_with_another_context_width():
    torch.manual_seed(3)
    module = CrossAttention(WIDTH, 12, HEADS).eval()
    x, context = torch.randn(2, TOKENS, WIDTH), torch.randn(2, 5, 12)
    r = traced_region(module, x, context)
    assert r.kind == "cross_attention" and r.context_width == 12
    op = build("mha", r)
    assert op.cross and op.kv.in_features == 12 and set(op.state_dict()) == {
        "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"}
    torch.testing.assert_close(op(x, context), module(x, context), rtol=0, atol=0)
    other = torch.randn(2, 7, 12)                                # any context length
    torch.testing.assert_close(op(x, other), module(x, other), rtol=0, atol=0)
    # FLOPs: the pattern's count of the traced original (q: 2*9*16*16 = 4608, k and v:
    # 2*5*12*32 = 3840, out: 4608, QK^T and PV: 4*9*5*16 = 2880; total 15936).
    assert op.flops(TOKENS, 5) == r.flops == 15936


@pytest.mark.parametrize("name", ORIGINALS)
def test_swa_with_a_window_covering_the_sequence_is_the_original(name):
    module, r, x = _original(name)
    op = build("swa", r, window=TOKENS - 1)
    with torch.no_grad(), triton_path():
        got = op(x)
    torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-5)
    local = build("swa", r, window=1)
    with torch.no_grad():
        assert (local.reference()(x) - module(x)).abs().max() > 1e-3     # a real window differs


@pytest.mark.parametrize("name", ORIGINALS)
def test_nat2d_with_a_kernel_covering_the_grid_is_the_original(name):
    module, r, x = _original(name)
    op = build("nat2d", r, kernel_size=3)                       # 3 x 3 window on the 3 x 3 grid
    with torch.no_grad(), triton_path():
        got = op(x)
    torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dit", "ln-head", "rms-width", "scale-out12"])
def test_linear_attention_copy_is_linear_attention_of_the_original_qkv(name):
    module, r, x = _original(name)
    op = build("linear_attention", r)
    with torch.no_grad(), triton_path():
        got = op(x)
        q, k, v = (t.double() for t in _qkv_heads(module, x))       # the original's, norms included
        phi = lambda t: F.elu(t) + 1                                # noqa: E731
        num = phi(q) @ (phi(k).transpose(-1, -2) @ v)
        den = phi(q) @ phi(k).sum(2, keepdim=True).transpose(-1, -2) + op.config.eps
        proj = module.proj
        want = F.linear(merge_heads(num / den), proj.weight.double(), proj.bias.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_copy_of_a_width_norm_without_parameters():
    # The region records the size a norm normalises over: without affine parameters there is no
    # weight to read it from, and a norm over the width must not become one over the head dim.
    torch.manual_seed(3)
    module = SelfAttention(WIDTH, HEADS, norm="layer_norm", over="width").eval()
    module.q_norm = torch.nn.LayerNorm(WIDTH, elementwise_affine=False)
    module.k_norm = torch.nn.LayerNorm(WIDTH, elementwise_affine=False)
    x = torch.randn(2, TOKENS, WIDTH)
    op = build("mha", traced_region(module, x, grid=GRID))
    torch.testing.assert_close(op(x), module(x))


# --------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("name", ["mha", "swa", "nat2d", "linear_attention"])
def test_heads_default_option_and_errors(name):
    fresh = dict(init="fresh")
    assert build(name, region(heads=4), **fresh).heads == 4                  # the region's
    assert build(name, region(heads=None), **fresh).heads == 16              # DEFAULT_HEADS
    op = build(name, region(heads=4), heads=2, **fresh)                      # the option wins
    assert (op.heads, op.head_dim) == (2, 8)
    assert op.reference()(torch.randn(1, TOKENS, WIDTH)).shape == (1, TOKENS, WIDTH)
    with pytest.raises(ValueError, match="heads=3 must divide the width 16"):
        build(name, region(heads=4), heads=3, **fresh)
    with pytest.raises(ValueError, match="heads=5 must divide"):             # nor the region's
        build(name, region(heads=5), **fresh)
    with pytest.raises(ValueError, match="head dim 512"):
        build(name, region(width=512, heads=1), **fresh)
    with pytest.raises(GraftError, match="heads must be an integer >= 1"):
        build(name, region(), heads=0)
    with pytest.raises(GraftError, match="heads must be an integer"):
        build(name, region(), heads=True)


def test_heads_error_names_the_rule_and_region():
    rule = Rule(pattern="self_attention", operator="swa", options={"heads": 3, "init": "fresh"})
    with pytest.raises(GraftError, match=r"rule 'self_attention->swa'.*blocks\.1\.attn.*heads=3 must divide"):
        build_operator(rule, region())


@pytest.mark.parametrize("name", ["mha", "swa", "nat2d", "linear_attention"])
def test_copy_needs_the_original_heads_and_weights(name):
    _, r, _ = _original("dit")
    with pytest.raises(ValueError, match="init='copy' needs the original heads=2, got heads=4"):
        build(name, r, heads=4)
    fresh = build(name, r, heads=4, init="fresh")                            # fresh: any heads
    assert fresh.heads == 4 and not torch.equal(fresh.proj.weight, r.weights["out.weight"])
    with pytest.raises(ValueError, match="use init='fresh'"):
        build(name, region())                                                # no weights to copy


def test_copy_takes_every_weight_and_zero_fills_missing_biases():
    w = {f"{n}.weight": torch.randn(WIDTH, WIDTH) for n in ("q", "k", "v", "out")}
    w |= {"k.bias": torch.randn(WIDTH)}
    op = build("swa", region(weights=w))
    torch.testing.assert_close(op.qkv.weight, torch.cat([w["q.weight"], w["k.weight"], w["v.weight"]]),
                               rtol=0, atol=0)
    torch.testing.assert_close(op.qkv.bias, torch.cat([torch.zeros(WIDTH), w["k.bias"], torch.zeros(WIDTH)]),
                               rtol=0, atol=0)
    assert torch.equal(op.proj.weight, w["out.weight"]) and not op.proj.bias.any()
    bad = dict(w, **{"out.weight": torch.randn(WIDTH, 8)})
    with pytest.raises(ValueError, match="do not fit"):
        build("swa", region(weights=bad))


# --------------------------------------------------------------------------------- out_width
@pytest.mark.parametrize("name", ["mha", "swa", "nat2d", "linear_attention"])
def test_out_width_differs_from_width(name):
    op = build(name, region(out_width=12), init="fresh")
    assert op.proj.weight.shape == (12, WIDTH)
    x = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad():
        y = op.reference()(x)
        # the core's output, projected by hand to the 12 outputs
        core = op.reference().kernel(*op.project(x))
        assert y.shape == (2, TOKENS, 12)
        torch.testing.assert_close(y, merge_heads(core) @ op.proj.weight.T + op.proj.bias)
    # the output projection's FLOPs count 12 outputs: 2 * L * 16 * 12 instead of 2 * L * 16 * 16
    wide = build(name, region(), init="fresh")
    assert wide.flops(TOKENS) - op.flops(TOKENS) == 2 * TOKENS * WIDTH * (WIDTH - 12)


def test_copy_of_an_rms_norm_with_the_default_eps():
    # nn.RMSNorm(eps=None) uses the dtype's machine epsilon; the copy must too (not 1e-6)
    torch.manual_seed(4)
    module = SelfAttention(WIDTH, HEADS, norm="rms_norm", over="head").eval()
    module.q_norm.eps = module.k_norm.eps = None
    x = torch.randn(2, TOKENS, WIDTH) * 1e-3            # small activations: the eps matters
    r = traced_region(module, x, grid=GRID)
    assert r.details["q_norm"] == {"kind": "rms_norm", "shape": WIDTH // HEADS, "eps": None}
    with torch.no_grad():
        assert torch.equal(build("mha", r)(x), module(x))
