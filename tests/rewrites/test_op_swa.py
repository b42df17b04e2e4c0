"""The ``swa`` operator: its math on the Triton path against a plain-torch sliding window
(outputs and gradients), the Triton path against the reference, the window's reach, options,
backends, precision, compile, and FLOPs counted by torch's FLOP counter on the plain form.
(Copy-init reproducing the original attention: test_attention_base.py.)"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.kernels.swa import flash_attn_available
from graftfx.registry import get_operator
from graftfx.rewrites.operators.swa import SlidingWindowAttention, window_pairs

from ._support import assert_triton_matches_reference, build, flop_count, region, triton_path

WIDTH, HEADS, TOKENS = 16, 2, 9


def _swa(tokens=TOKENS, heads=HEADS, **options):
    torch.manual_seed(1)
    return build("swa", region(WIDTH, tokens, heads), **{"init": "fresh", **options})


def plain_swa(op, x, window, scale=None):
    """Independent computation in fp64: per query i, a softmax over keys i-window..i+window only."""
    B, L, D = x.shape
    H, Dh = op.heads, D // op.heads
    scale = Dh ** -0.5 if scale is None else scale
    q, k, v = F.linear(x.double(), op.qkv.weight.double(), op.qkv.bias.double()).split(D, dim=-1)
    rows = []
    for i in range(L):
        lo, hi = max(0, i - window), min(L, i + window + 1)
        qi = q[:, i].reshape(B, H, 1, Dh)
        ks, vs = (t[:, lo:hi].reshape(B, hi - lo, H, Dh).transpose(1, 2) for t in (k, v))
        p = torch.softmax((qi @ ks.transpose(-1, -2)) * scale, dim=-1)
        rows.append((p @ vs).reshape(B, D))
    return F.linear(torch.stack(rows, 1), op.proj.weight.double(), op.proj.bias.double())


@pytest.mark.parametrize("window", [0, 1, 3, TOKENS - 1, 30])
def test_triton_path_is_the_sliding_window(window):
    op = _swa(window=window)
    x = torch.randn(2, TOKENS, WIDTH, requires_grad=True)
    with triton_path():
        y = op(x)
        cot = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, op.qkv.weight, op.proj.weight], cot)
    want_y = plain_swa(op, x, window)
    want = torch.autograd.grad(want_y, [x, op.qkv.weight, op.proj.weight], cot.double())
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("dx", "dqkv", "dproj"), got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_triton_path_with_a_scale_of_its_own():
    op = _swa(window=2)
    op.scale = 0.9                        # what init="copy" sets from a non-default original
    x = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad(), triton_path():
        y = op(x)
    torch.testing.assert_close(y.double(), plain_swa(op, x, 2, scale=0.9), rtol=1e-5, atol=1e-5)
    assert (y.double() - plain_swa(op, x, 2)).abs().max() > 1e-3


@pytest.mark.parametrize("window", [1, 4])
def test_triton_path_matches_reference(window):
    op = _swa(window=window)
    op.scale = 0.7
    assert_triton_matches_reference(op, torch.randn(3, TOKENS, WIDTH))


def test_a_token_reaches_exactly_its_window():
    """Perturb token j: outputs change at |i - j| <= window and nowhere else."""
    op, window, j = _swa(window=2), 2, 4
    x = torch.randn(1, TOKENS, WIDTH)
    x2 = x.clone()
    x2[:, j] += 1.0
    with torch.no_grad(), triton_path():
        changed = (op(x) - op(x2)).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.nonzero().flatten().tolist() == list(range(j - window, j + window + 1))


def test_defaults_follow_the_paper_and_region():
    op = _swa()
    assert (op.config.window, op.heads, op.config.backend, op.config.init) == (4, HEADS, "triton", "fresh")
    assert get_operator("swa").config().init == "copy"


def test_backend_reference_never_launches_triton():
    op = _swa(window=2, backend="reference")
    x = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad(), triton_path(expect_launch=False):
        y = op(x)
    torch.testing.assert_close(y.double(), plain_swa(op, x, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(flash_attn_available(), reason="flash_attn is installed here")
def test_flash_attn_backend_falls_back_to_the_triton_kernel():
    with pytest.warns(UserWarning, match="flash_attn"):
        op = _swa(window=2, backend="flash_attn")
    x = torch.randn(1, TOKENS, WIDTH)
    with warnings.catch_warnings(), torch.no_grad(), triton_path():
        warnings.simplefilter("error")                  # no warning per call
        y = op(x)
    torch.testing.assert_close(y.double(), plain_swa(op, x, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_the_triton_path(dtype):
    op = _swa(window=2)
    x = torch.randn(2, TOKENS, WIDTH)
    want = plain_swa(op, x, 2)
    with torch.no_grad(), triton_path():
        mixed = op(x.to(dtype))                          # fp32 module, low-precision input
    assert mixed.dtype == dtype
    torch.testing.assert_close(mixed.double(), want, rtol=0.02, atol=0.02)
    low = op.to(dtype)
    xl = x.to(dtype).requires_grad_()
    with triton_path():
        y = low(xl)
        y.float().square().sum().backward()
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), want, rtol=0.05, atol=0.05)
    assert torch.isfinite(xl.grad).all() and xl.grad.abs().sum() > 0


def test_compiles_without_graph_breaks():
    op = _swa(window=2)
    x = torch.randn(2, TOKENS, WIDTH, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(op, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, op(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(op(x).sum(), x)
    torch.testing.assert_close(g, want)


def test_window_pairs_by_hand():
    # L=3, window 1: (0,0) (0,1) | (1,0) (1,1) (1,2) | (2,1) (2,2) = 7 pairs
    assert window_pairs(3, 1) == 7
    # L=5, window 2: keys per query 3, 4, 5, 4, 3 = 19
    assert window_pairs(5, 2) == 19
    assert window_pairs(3, 0) == 3 and window_pairs(3, 2) == window_pairs(3, 9) == 9


def test_flops_by_hand_on_a_tiny_shape():
    op = build("swa", region(4, 3, 2), init="fresh", window=1)
    # width 4, L = 3, window 1 (7 pairs): qkv 2*3*4*12 = 288, proj 2*3*4*4 = 96,
    # QK^T and PV over the pairs: 2 * 2*7*4 = 112 (all heads: 2 per multiply-add, width 4)
    assert op.flops(3) == 288 + 96 + 112 == 496


@pytest.mark.parametrize("window", [0, 2, 30])
def test_flops_equal_the_flop_counter_on_the_plain_form(window):
    """The plain form multiplies only the pairs inside the window; torch counts its matmuls."""
    op = _swa(window=window)
    assert op.flops(TOKENS) == flop_count(plain_swa, op, torch.randn(1, TOKENS, WIDTH), window)


@pytest.mark.parametrize("options,name", [
    (dict(window=-1), "window"),
    (dict(window=2.0), "window"),
    (dict(heads=0), "heads"),
    (dict(backend="cuda"), "backend"),
    (dict(init="zeros"), "init"),
])
def test_invalid_options(options, name):
    spec = get_operator("swa")
    with pytest.raises(ValueError, match=name):
        spec.config(**options)
    with pytest.raises(GraftError, match=f"operator 'swa': {name}"):
        spec.make_config(options)


def test_registered():
    spec = get_operator("swa")
    assert spec.cls is SlidingWindowAttention
    assert spec.kinds == ("self_attention",) and spec.loss == "l1"
    assert spec.option_names() == ["heads", "init", "window", "backend"]
    with pytest.raises(GraftError, match="unknown option 'windw'"):
        spec.make_config({"windw": 4})
