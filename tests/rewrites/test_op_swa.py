"""The ``swa`` operator: construction from a region, shapes, gradients, options, and its math."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.kernels._dispatch import kernels
from graftfx.kernels.swa import flash_attn_available
from graftfx.match.region import Region
from graftfx.models.dit import Attention
from graftfx.rewrites.operators.swa import SlidingWindowAttention, window_pairs
from graftfx.registry import get_operator


def _region(width=64, tokens=16, heads=4, grid=None, weights=None, out_width=None):
    return Region(path="blocks.1.attn", kind="self_attention", pattern="self_attention",
                  input=None, output=None, nodes=(), width=width, out_width=out_width or width,
                  tokens=tokens, grid=grid, heads=heads, head_dim=width // heads if heads else None,
                  weights=weights or {})


def _attention_weights(attn: Attention) -> dict:
    """Region.weights of a DiT attention: q/k/v rows split out of the packed qkv."""
    d = attn.proj.in_features
    w, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
    out = {f"{n}.weight": w[i * d:(i + 1) * d] for i, n in enumerate("qkv")}
    out |= {f"{n}.bias": b[i * d:(i + 1) * d] for i, n in enumerate("qkv")}
    return out | {"out.weight": attn.proj.weight.detach(), "out.bias": attn.proj.bias.detach()}


def _plain_swa(mod: SlidingWindowAttention, x: torch.Tensor, window: int) -> torch.Tensor:
    """Independent computation: per query, softmax over the keys i-window..i+window."""
    B, L, D = x.shape
    H, Dh = mod.heads, D // mod.heads
    q, k, v = F.linear(x, mod.qkv.weight, mod.qkv.bias).double().split(D, dim=-1)
    out = torch.zeros(B, L, H, Dh, dtype=torch.float64)
    for i in range(L):
        lo, hi = max(0, i - window), min(L, i + window + 1)
        qi = q[:, i].view(B, H, 1, Dh)
        ks, vs = (t[:, lo:hi].reshape(B, hi - lo, H, Dh).transpose(1, 2) for t in (k, v))
        p = torch.softmax((qi @ ks.transpose(-1, -2)) / Dh ** 0.5, dim=-1)
        out[:, i] = (p @ vs).squeeze(2)
    return F.linear(out.reshape(B, L, D), mod.proj.weight.double(), mod.proj.bias.double())


@pytest.mark.parametrize("batch", [1, 3])
def test_forward_backward_shapes_and_gradients(batch):
    mod = SlidingWindowAttention.from_region(_region(64, 24, 4), init="fresh")
    x = torch.randn(batch, 24, 64, requires_grad=True)
    y = mod(x)
    assert y.shape == (batch, 24, 64) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_defaults_follow_the_paper_and_region():
    mod = SlidingWindowAttention.from_region(_region(64, 16, 4), init="fresh")
    assert mod.config.window == 4 and mod.heads == 4 and mod.config.backend == "triton"
    assert SlidingWindowAttention.from_region(_region(64, 16, None), init="fresh").heads == 16
    assert SlidingWindowAttention.from_region(_region(64, 16, 4), init="fresh", heads=2).heads == 2
    wide = SlidingWindowAttention.from_region(_region(64, 16, 4, out_width=48), init="fresh")
    assert wide(torch.randn(2, 16, 64)).shape == (2, 16, 48)


@pytest.mark.parametrize("window", [0, 1, 4, 30])
def test_math_matches_plain_torch(window):
    mod = SlidingWindowAttention.from_region(_region(32, 13, 2), init="fresh", window=window)
    x = torch.randn(3, 13, 32)
    with torch.no_grad():
        got = mod(x)
    torch.testing.assert_close(got.double(), _plain_swa(mod, x, window), rtol=1e-5, atol=1e-5)


def test_copied_weights_and_full_window_reproduce_the_original_attention():
    attn = Attention(64, 4)
    region = _region(64, 20, 4, weights=_attention_weights(attn))
    mod = SlidingWindowAttention.from_region(region, window=1000)
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), attn(x), rtol=1e-5, atol=1e-5)
        local = SlidingWindowAttention.from_region(region)(x)   # window 4: differs
    assert (local - attn(x)).abs().max() > 1e-3


def test_triton_path_matches_reference_path():
    mod = SlidingWindowAttention.from_region(_region(32, 20, 2), init="fresh")
    x = torch.randn(2, 20, 32, requires_grad=True)
    outs = {}
    for path in ("triton", "reference"):
        with kernels(path):
            y = mod(x)
            outs[path] = (y, *torch.autograd.grad(y.square().sum(), (x, mod.qkv.weight)))
    for name, got, want in zip(("y", "dx", "dqkv"), outs["triton"], outs["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    mod = SlidingWindowAttention.from_region(_region(32, 16, 2), init="fresh")
    x = torch.randn(3, 16, 32)
    want = mod(x)
    y = mod(x.to(dtype))                                   # fp32 module, low-precision input
    assert y.dtype == dtype and torch.isfinite(y).all()
    low = mod.to(dtype)                                    # low-precision module and input
    xl = x.to(dtype).requires_grad_()
    y = low(xl)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)
    y.float().square().sum().backward()
    assert torch.isfinite(xl.grad.float()).all()
    assert all(torch.isfinite(p.grad.float()).all() for p in low.parameters())


def test_backend_reference_matches_default():
    region = _region(32, 16, 2)
    mod = SlidingWindowAttention.from_region(region, init="fresh")
    ref = SlidingWindowAttention.from_region(region, init="fresh", backend="reference")
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(ref(x), mod(x), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(flash_attn_available(), reason="flash_attn is installed here")
def test_flash_attn_backend_falls_back_when_absent():
    with pytest.warns(UserWarning, match="flash_attn"):
        mod = SlidingWindowAttention.from_region(_region(32, 16, 2), init="fresh",
                                                 backend="flash_attn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mod(torch.randn(1, 16, 32)).shape == (1, 16, 32)


def test_compiles_without_graph_breaks():
    mod = SlidingWindowAttention.from_region(_region(32, 16, 2), init="fresh")
    x = torch.randn(2, 16, 32, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(mod, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, mod(x))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_flops():
    mod = SlidingWindowAttention.from_region(_region(64, 16, 4), init="fresh")
    proj = 2 * 16 * 64 * 192 + 2 * 16 * 64 * 64
    assert mod.flops(16) == proj + 4 * (16 * 9 - 20) * 64         # 9-wide window, clipped ends
    assert window_pairs(16, 4) == sum(min(i + 4, 15) - max(i - 4, 0) + 1 for i in range(16))
    assert window_pairs(16, 15) == window_pairs(16, 99) == 256


@pytest.mark.parametrize("options,name", [
    (dict(window=-1), "window"),
    (dict(window=2.0), "window"),
    (dict(heads=0), "heads"),
    (dict(heads=5), "heads"),                  # does not divide 64
    (dict(backend="cuda"), "backend"),
    (dict(init="zeros"), "init"),
    (dict(), "init='fresh'"),                  # init="copy" but the region has no weights
])
def test_invalid_options(options, name):
    with pytest.raises(ValueError, match=name):
        SlidingWindowAttention.from_region(_region(64, 16, 4), **options)


def test_registered():
    spec = get_operator("swa")
    assert spec.cls is SlidingWindowAttention
    assert spec.kinds == ("self_attention",) and spec.loss == "l1"
    assert spec.option_names() == ["window", "heads", "backend", "init"]
    with pytest.raises(GraftError, match="windw"):
        spec.make_config({"windw": 4})
    with pytest.raises(GraftError, match="window"):
        spec.make_config({"window": -2})
