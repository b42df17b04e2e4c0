"""The ``nat2d`` operator: construction from a region, shapes, gradients, options, its math."""
import pytest
import torch
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.kernels._dispatch import kernels
from graftfx.match.region import Region
from graftfx.models.dit import Attention
from graftfx.rewrites.operators.nat2d import NeighborhoodAttention2D
from graftfx.registry import get_operator


def _region(width=64, tokens=16, heads=4, grid=None, weights=None, out_width=None):
    return Region(path="blocks.1.attn", kind="self_attention", pattern="self_attention",
                  input=None, output=None, nodes=(), width=width, out_width=out_width or width,
                  tokens=tokens, grid=grid, heads=heads, head_dim=width // heads if heads else None,
                  weights=weights or {})


def _attention_weights(attn: Attention) -> dict:
    d = attn.proj.in_features
    w, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
    out = {f"{n}.weight": w[i * d:(i + 1) * d] for i, n in enumerate("qkv")}
    out |= {f"{n}.bias": b[i * d:(i + 1) * d] for i, n in enumerate("qkv")}
    return out | {"out.weight": attn.proj.weight.detach(), "out.bias": attn.proj.bias.detach()}


def _start(i: int, n: int, ks: int) -> int:
    """NATTEN's window start as NATTEN states it: centred, shifted inward at the borders."""
    r = ks // 2
    return max(i - r, 0) + (n - i - r - 1 if i + r >= n else 0)


def _plain_nat2d(mod, x, grid, ks):
    """Independent computation: per query, softmax over the keys of its k x k window."""
    B, L, D = x.shape
    H, Dh = mod.heads, D // mod.heads
    gh, gw = grid
    q, k, v = (t.reshape(B, gh, gw, H, Dh)
               for t in F.linear(x, mod.qkv.weight, mod.qkv.bias).double().split(D, dim=-1))
    out = torch.zeros(B, gh, gw, H, Dh, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            si, sj = _start(i, gh, ks), _start(j, gw, ks)
            ks_ = k[:, si:si + ks, sj:sj + ks].reshape(B, -1, H, Dh).transpose(1, 2)
            vs_ = v[:, si:si + ks, sj:sj + ks].reshape(B, -1, H, Dh).transpose(1, 2)
            p = torch.softmax(q[:, i, j, :, None, :] @ ks_.transpose(-1, -2) / Dh ** 0.5, -1)
            out[:, i, j] = (p @ vs_).squeeze(2)
    return F.linear(out.reshape(B, L, D), mod.proj.weight.double(), mod.proj.bias.double())


@pytest.mark.parametrize("batch", [1, 3])
def test_forward_backward_shapes_and_gradients(batch):
    mod = NeighborhoodAttention2D.from_region(_region(64, 36, 4), init="fresh", kernel_size=3)
    x = torch.randn(batch, 36, 64, requires_grad=True)
    y = mod(x)
    assert y.shape == (batch, 36, 64) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_defaults_and_grid():
    mod = NeighborhoodAttention2D.from_region(_region(64, 256, 4), init="fresh")
    assert mod.config.kernel_size == 7 and mod.heads == 4 and mod.grid == (16, 16)
    mod = NeighborhoodAttention2D.from_region(_region(64, 15, None, grid=(3, 5)), init="fresh")
    assert mod.grid == (3, 5) and mod.heads == 16
    assert mod(torch.randn(2, 15, 64)).shape == (2, 15, 64)
    with pytest.raises(ValueError, match="grid"):
        NeighborhoodAttention2D.from_region(_region(64, 15, 4), init="fresh")
    with pytest.raises(ValueError, match="3x5"):
        mod(torch.randn(2, 16, 64))
    wide = NeighborhoodAttention2D.from_region(_region(64, 16, 4, out_width=48), init="fresh")
    assert wide(torch.randn(2, 16, 64)).shape == (2, 16, 48)


@pytest.mark.parametrize("grid,ks", [((4, 6), 3), ((5, 5), 5), ((3, 7), 3), ((6, 6), 1)])
def test_math_matches_plain_torch(grid, ks):
    L = grid[0] * grid[1]
    mod = NeighborhoodAttention2D.from_region(_region(32, L, 2, grid=grid), init="fresh",
                                              kernel_size=ks)
    x = torch.randn(3, L, 32)
    with torch.no_grad():
        got = mod(x)
    torch.testing.assert_close(got.double(), _plain_nat2d(mod, x, grid, ks), rtol=1e-5, atol=1e-5)


def test_copied_weights_and_whole_grid_window_reproduce_the_original_attention():
    attn = Attention(64, 4)
    region = _region(64, 20, 4, grid=(4, 5), weights=_attention_weights(attn))
    mod = NeighborhoodAttention2D.from_region(region, kernel_size=5)
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), attn(x), rtol=1e-5, atol=1e-5)
        local = NeighborhoodAttention2D.from_region(region, kernel_size=3)(x)
    assert (local - attn(x)).abs().max() > 1e-3


def test_triton_path_matches_reference_path():
    mod = NeighborhoodAttention2D.from_region(_region(32, 20, 2, grid=(4, 5)), init="fresh",
                                              kernel_size=3)
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
    mod = NeighborhoodAttention2D.from_region(_region(32, 16, 2), init="fresh", kernel_size=3)
    x = torch.randn(3, 16, 32)
    want = mod(x)
    y = mod(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    low = mod.to(dtype)
    xl = x.to(dtype).requires_grad_()
    y = low(xl)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)
    y.float().square().sum().backward()
    assert torch.isfinite(xl.grad.float()).all()
    assert all(torch.isfinite(p.grad.float()).all() for p in low.parameters())


def test_compiles_without_graph_breaks():
    mod = NeighborhoodAttention2D.from_region(_region(32, 16, 2), init="fresh", kernel_size=3)
    x = torch.randn(2, 16, 32, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(mod, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, mod(x))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_flops():
    mod = NeighborhoodAttention2D.from_region(_region(64, 256, 4), init="fresh")
    proj = 2 * 256 * 64 * 192 + 2 * 256 * 64 * 64
    assert mod.flops(256) == proj + 4 * 256 * 49 * 64
    small = NeighborhoodAttention2D.from_region(_region(64, 15, 4, grid=(3, 5)), init="fresh")
    assert small.flops(15) == 2 * 15 * 64 * 256 + 4 * 15 * 15 * 64  # 7 > 3, 5: all 15 keys


@pytest.mark.parametrize("options,name", [
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=3.0), "kernel_size"),
    (dict(heads=0), "heads"),
    (dict(heads=6), "heads"),                  # does not divide 64
    (dict(init="zeros"), "init"),
    (dict(), "init='fresh'"),                  # init="copy" but the region has no weights
])
def test_invalid_options(options, name):
    with pytest.raises(ValueError, match=name):
        NeighborhoodAttention2D.from_region(_region(64, 16, 4), **options)


def test_registered():
    spec = get_operator("nat2d")
    assert spec.cls is NeighborhoodAttention2D
    assert spec.kinds == ("self_attention",) and spec.loss == "l1"
    assert spec.option_names() == ["kernel_size", "heads", "init"]
    with pytest.raises(GraftError, match="kernel_size"):
        spec.make_config({"kernel_size": 2})
