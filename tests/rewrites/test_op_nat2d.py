"""The ``nat2d`` operator: its math on the Triton path against a plain-torch neighbourhood
(outputs and gradients), the Triton path against the reference, each token's reach on the
grid, the grid itself, options, precision, compile, and FLOPs counted by torch's FLOP counter
on the plain form. (Copy-init reproducing the original attention: test_attention_base.py.)"""
import pytest
import torch
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.registry import get_operator
from graftfx.rewrites.operators.nat2d import NeighborhoodAttention2D

from ._support import assert_triton_matches_reference, build, flop_count, region, triton_path

WIDTH, HEADS = 16, 2


def _nat(grid=(4, 4), tokens=None, heads=HEADS, **options):
    torch.manual_seed(1)
    tokens = tokens or grid[0] * grid[1]
    return build("nat2d", region(WIDTH, tokens, heads, grid=grid), **{"init": "fresh", **options})


def _start(i: int, n: int, ks: int) -> int:
    """NATTEN's window start as NATTEN states it: centred, shifted inward at the borders."""
    r = ks // 2
    if ks >= n:
        return 0
    return max(i - r, 0) + (n - i - r - 1 if i + r >= n else 0)


def plain_nat2d(op, x, grid, ks, scale=None):
    """Independent computation in fp64: per query, a softmax over the keys of its window only."""
    B, L, D = x.shape
    H, Dh = op.heads, D // op.heads
    gh, gw = grid
    scale = Dh ** -0.5 if scale is None else scale
    q, k, v = (t.reshape(B, gh, gw, H, Dh) for t in
               F.linear(x.double(), op.qkv.weight.double(), op.qkv.bias.double()).split(D, dim=-1))
    rows = []
    for i in range(gh):
        for j in range(gw):
            si, sj = _start(i, gh, ks), _start(j, gw, ks)
            win = (slice(None), slice(si, si + ks), slice(sj, sj + ks))
            kw, vw = (t[win].reshape(B, -1, H, Dh).transpose(1, 2) for t in (k, v))
            p = torch.softmax(q[:, i, j, :, None, :] @ kw.transpose(-1, -2) * scale, -1)
            rows.append((p @ vw).reshape(B, D))
    return F.linear(torch.stack(rows, 1), op.proj.weight.double(), op.proj.bias.double())


@pytest.mark.parametrize("grid,ks", [((4, 4), 3), ((3, 5), 3), ((2, 5), 3), ((3, 3), 1), ((5, 5), 5)])
def test_triton_path_is_the_neighbourhood(grid, ks):
    op = _nat(grid, kernel_size=ks)
    x = torch.randn(2, grid[0] * grid[1], WIDTH, requires_grad=True)
    with triton_path():
        y = op(x)
        cot = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, op.qkv.weight, op.proj.weight], cot)
    want_y = plain_nat2d(op, x, grid, ks)
    want = torch.autograd.grad(want_y, [x, op.qkv.weight, op.proj.weight], cot.double())
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("dx", "dqkv", "dproj"), got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_triton_path_with_a_scale_of_its_own():
    op = _nat((4, 4), kernel_size=3)
    op.scale = 0.9                        # what init="copy" sets from a non-default original
    x = torch.randn(2, 16, WIDTH)
    with torch.no_grad(), triton_path():
        y = op(x)
    torch.testing.assert_close(y.double(), plain_nat2d(op, x, (4, 4), 3, scale=0.9), rtol=1e-5, atol=1e-5)
    assert (y.double() - plain_nat2d(op, x, (4, 4), 3)).abs().max() > 1e-3


@pytest.mark.parametrize("grid,ks", [((4, 4), 3), ((3, 5), 3)])
def test_triton_path_matches_reference(grid, ks):
    op = _nat(grid, kernel_size=ks)
    op.scale = 0.7
    assert_triton_matches_reference(op, torch.randn(3, grid[0] * grid[1], WIDTH))


@pytest.mark.parametrize("i,j", [(1, 2), (0, 0), (3, 4)])
def test_a_token_reaches_the_queries_whose_window_holds_it(i, j):
    grid, ks = (4, 5), 3
    op = _nat(grid, kernel_size=ks)
    x = torch.randn(1, 20, WIDTH)
    x2 = x.clone()
    x2[:, i * grid[1] + j] += 1.0
    with torch.no_grad(), triton_path():
        changed = ((op(x) - op(x2)).abs().amax(dim=(0, 2)) > 1e-6).reshape(grid)
    expect = torch.zeros(grid, dtype=torch.bool)
    for a in range(grid[0]):
        for b in range(grid[1]):
            sa, sb = _start(a, grid[0], ks), _start(b, grid[1], ks)
            expect[a, b] = sa <= i < sa + ks and sb <= j < sb + ks
    assert torch.equal(changed, expect)


def test_defaults_and_grid():
    op = _nat((4, 4))
    assert (op.config.kernel_size, op.heads, op.grid) == (7, HEADS, (4, 4))
    op = build("nat2d", region(WIDTH, 16, HEADS), init="fresh")        # square token count
    assert op.grid is None and op.flops(16) > 0
    wide = _nat((3, 5))
    assert wide.grid == (3, 5)
    with pytest.raises(ValueError, match="needs the token grid: 15 tokens is not a square"):
        build("nat2d", region(WIDTH, 15, HEADS), init="fresh")
    with pytest.raises(ValueError, match="built for a 3x5 token grid but got 16 tokens"):
        wide.reference()(torch.randn(1, 16, WIDTH))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_the_triton_path(dtype):
    op = _nat((4, 4), kernel_size=3)
    x = torch.randn(2, 16, WIDTH)
    want = plain_nat2d(op, x, (4, 4), 3)
    with torch.no_grad(), triton_path():
        mixed = op(x.to(dtype))
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
    op = _nat((4, 4), kernel_size=3)
    x = torch.randn(2, 16, WIDTH, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(op, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, op(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(op(x).sum(), x)
    torch.testing.assert_close(g, want)


def test_flops_by_hand_on_a_tiny_shape():
    op = build("nat2d", region(4, 6, 2, grid=(2, 3)), init="fresh", kernel_size=1)
    # width 4, grid 2 x 3, 1 x 1 windows (6 pairs): qkv 2*6*4*12 = 576, proj 2*6*4*4 = 192,
    # QK^T and PV over the pairs: 2 * 2*6*4 = 96
    assert op.flops(6) == 576 + 192 + 96 == 864
    wide = build("nat2d", region(4, 6, 2, grid=(2, 3)), init="fresh", kernel_size=5)
    # a 5 x 5 kernel on 2 x 3 sees all 6 keys: 36 pairs, 2 * 2*36*4 = 576
    assert wide.flops(6) == 576 + 192 + 576


@pytest.mark.parametrize("grid,ks", [((4, 4), 3), ((3, 5), 3), ((3, 5), 7)])
def test_flops_equal_the_flop_counter_on_the_plain_form(grid, ks):
    op = _nat(grid, kernel_size=ks)
    x = torch.randn(1, grid[0] * grid[1], WIDTH)
    assert op.flops(grid[0] * grid[1]) == flop_count(plain_nat2d, op, x, grid, ks)


@pytest.mark.parametrize("options,name", [
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=3.0), "kernel_size"),
    (dict(heads=0), "heads"),
    (dict(init="zeros"), "init"),
])
def test_invalid_options(options, name):
    spec = get_operator("nat2d")
    with pytest.raises(ValueError, match=name):
        spec.config(**options)
    with pytest.raises(GraftError, match=f"operator 'nat2d': {name}"):
        spec.make_config(options)


def test_registered():
    spec = get_operator("nat2d")
    assert spec.cls is NeighborhoodAttention2D
    assert spec.kinds == ("self_attention",) and spec.loss == "l1"
    assert spec.option_names() == ["heads", "init", "kernel_size"]
