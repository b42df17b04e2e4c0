"""2D neighbourhood attention: Triton kernels (interpreter) and custom op vs the fp32 reference."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graftfx

from graftfx.kernels._dispatch import kernels
from graftfx.kernels.nat2d import (fused, naive_nat2d, naive_nat2d_bwd, nat2d_bwd, nat2d_fwd,
                                   nat2d_mask, neighborhood_attention_2d)
from graftfx.kernels.nat2d.fused import _sweep
from graftfx.kernels.testing import OPCHECK_UTILS, TOL, assert_rel_close, record_calls

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

# (B, heads, grid, Dh, kernel_size, block_m, block_n, with_dlse); None blocks = defaults.
LAUNCHER_CASES = [
    # 7x9 grid: 16-query blocks straddle image rows (full-width sweeps).
    pytest.param(1, 2, (7, 9), 60, 3, 16, 16, True, id="B1-T63-7x9-H2-D60-k3-blk16"),
    # kernel 9 > 7 rows: the window spans every row (full attention along that axis).
    pytest.param(3, 1, (7, 9), 16, 9, 64, 32, False, id="B3-T63-7x9-H1-D16-k9>H"),
    pytest.param(1, 1, (15, 17), 16, 5, 64, 32, True, id="B1-T255-15x17-H1-D16-k5"),
    # 3x32 grid: blocks inside one image row sweep a column band in two chunks.
    pytest.param(1, 1, (3, 32), 16, 3, None, None, False, id="B1-T96-3x32-H1-D16-k3"),
]


def _inputs(B, H, L, D, dtype):
    return [torch.randn(B, H, L, D).to(dtype) for _ in range(3)]


def _reference(q, k, v, grid, ks, do, dlse, scale=None):
    """fp32 reference outputs and autograd gradients on fp32 copies of the inputs."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    o, lse = naive_nat2d(qf, kf, vf, grid, ks, scale)
    outs, grads = [o], [do.float()]
    if dlse is not None:
        outs.append(lse)
        grads.append(dlse)
    dq, dk, dv = torch.autograd.grad(outs, (qf, kf, vf), grads)
    return o.detach(), lse.detach(), dq, dk, dv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,grid,D,ks,block_m,block_n,with_dlse", LAUNCHER_CASES)
def test_launchers_match_reference(B, H, grid, D, ks, block_m, block_n, with_dlse, dtype):
    L = grid[0] * grid[1]
    q, k, v = _inputs(B, H, L, D, dtype)
    do = torch.randn(B, H, L, D).to(dtype)
    dlse = torch.randn(B, H, L) if with_dlse else None
    o, lse = nat2d_fwd(q, k, v, grid, ks, block_m=block_m, block_n=block_n)
    dq, dk, dv = nat2d_bwd(do, q, k, v, o, lse, grid, ks, dlse=dlse,
                           block_m=block_m, block_n=block_n)
    ref = _reference(q, k, v, grid, ks, do, dlse)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), ref):
        assert got.dtype == (torch.float32 if name == "lse" else dtype), name
        assert_rel_close(name, got.float(), want, TOL[dtype])


def test_launchers_fp16():
    test_launchers_match_reference(1, 2, (7, 9), 60, 5, 64, 32, True, torch.float16)


def test_launchers_accept_strided_views():
    B, H, grid, D, ks = 2, 2, (5, 6), 24, 3
    qkv = torch.randn(B, 30, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    do = torch.randn(B, 30, H, D).transpose(1, 2)
    o, lse = nat2d_fwd(q, k, v, grid, ks)
    dq, dk, dv = nat2d_bwd(do, q, k, v, o, lse, grid, ks)
    ref = _reference(q, k, v, grid, ks, do, None)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), ref):
        assert_rel_close(name, got, want, TOL[torch.float32])


def _natten_start(i: int, n: int, ks: int) -> int:
    """NATTEN's window start, written as NATTEN states it (independent of window_start)."""
    r = ks // 2
    return max(i - r, 0) + (n - i - r - 1 if i + r >= n else 0)


@pytest.mark.parametrize("grid,ks", [((7, 9), 3), ((7, 9), 5), ((16, 16), 7), ((5, 8), 5)])
def test_mask_follows_natten_convention(grid, ks):
    h, w = grid
    mask = nat2d_mask(h, w, ks)
    for token in range(h * w):
        i, j = divmod(token, w)
        si, sj = _natten_start(i, h, ks), _natten_start(j, w, ks)
        want = torch.zeros(h, w, dtype=torch.bool)
        want[si:si + ks, sj:sj + ks] = True
        assert torch.equal(mask[token], want.flatten()), f"token {token} ({i}, {j})"


def test_mask_window_larger_than_grid_covers_the_axis():
    mask = nat2d_mask(3, 8, 5)  # 5 > 3 rows: every row; 5 columns
    assert (mask.view(24, 3, 8).any(-1)).all()
    assert mask.sum(1).eq(15).all()


def test_reference_backward_matches_autograd():
    grid, ks = (5, 7), 3
    q, k, v = _inputs(2, 2, 35, 12, torch.float32)
    do, dlse = torch.randn(2, 2, 35, 12), torch.randn(2, 2, 35)
    want = _reference(q, k, v, grid, ks, do, dlse)[2:]
    got = naive_nat2d_bwd(do, dlse, q, k, v, grid, ks)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_rel_close(name, g, w, 1e-6)


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,grid,D,ks,scale", [
    # a custom scale: the op must hand it to both kernels (the launcher tests use the default)
    pytest.param(3, 1, (7, 9), 60, 5, 0.3, id="B3-T63-7x9-H1-D60-k5-s0.3"),
])
def test_custom_op_autograd(B, H, grid, D, ks, scale, dtype, path, monkeypatch):
    calls = record_calls(monkeypatch, fused.nat2d_fwd, fused.nat2d_bwd)
    L = grid[0] * grid[1]
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, L, D, dtype))
    do, dlse = torch.randn(B, H, L, D).to(dtype), torch.randn(B, H, L)
    with kernels(path):
        o, lse = neighborhood_attention_2d(q, k, v, grid, ks, scale=scale, return_lse=True)
        dq, dk, dv = torch.autograd.grad((o, lse), (q, k, v), (do, dlse))
    assert calls == (["nat2d_fwd", "nat2d_bwd"] if path == "triton" else [])
    ref = _reference(q, k, v, grid, ks, do, dlse, scale)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), ref):
        assert got.dtype == (torch.float32 if name == "lse" else dtype), name
        assert_rel_close(name, got.float(), want, TOL[dtype])


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_opcheck(path, monkeypatch):
    # Schema, fakes and autograd registration of both ops on the path named (in Triton mode
    # the interpreter runs the kernels inside every check), plus AOT dispatch on the reference.
    calls = record_calls(monkeypatch, fused.nat2d_fwd, fused.nat2d_bwd)
    utils = OPCHECK_UTILS[path]
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 20, 8, torch.float32))
    args = (4, 5, 3, 0.35)
    with kernels(path):
        torch.library.opcheck(torch.ops.graftfx.nat2d.default, (q, k, v, *args), test_utils=utils)
        q, k, v = q.detach(), k.detach(), v.detach()
        o, lse = torch.ops.graftfx.nat2d(q, k, v, *args)
        do, dlse = torch.randn_like(o), torch.randn_like(lse)
        torch.library.opcheck(torch.ops.graftfx.nat2d_bwd.default,
                              (do, dlse, q, k, v, o, lse, *args), test_utils=utils)
    assert ({"nat2d_fwd", "nat2d_bwd"} <= set(calls)) if path == "triton" else calls == []


def test_compiles_without_graph_breaks(monkeypatch):
    # One fullgraph trace, run on the Triton path and checked against the fp32 reference: the
    # compiled graph must call the same op (and its backward op) as eager mode.
    calls = record_calls(monkeypatch, fused.nat2d_fwd, fused.nat2d_bwd)
    B, H, grid, D, ks = 1, 2, (5, 7), 12, 3
    L = grid[0] * grid[1]
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, L, D, torch.float32))
    w_o, w_lse = torch.randn(B, H, L, D), torch.randn(B, H, L)

    def f(q, k, v):
        o, lse = neighborhood_attention_2d(q, k, v, grid, ks, return_lse=True)
        return (o * w_o).sum() + (lse * w_lse).sum()

    torch._dynamo.reset()
    with kernels("triton"):
        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
    assert calls == ["nat2d_fwd", "nat2d_bwd"]
    o, lse, *want = _reference(q, k, v, grid, ks, w_o, w_lse)
    assert_rel_close("loss", loss, (o * w_o).sum() + (lse * w_lse).sum(), TOL[torch.float32])
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert_rel_close(name, g, w, TOL[torch.float32])


def _configs(tuned):
    return sorted((c.kwargs[c.owned], c.num_warps, c.num_stages) for c in tuned)


def test_autotune_runs_one_config_in_the_interpreter_and_prunes_per_dtype(monkeypatch):
    # Under the interpreter every tuned kernel has exactly one config (nothing is benchmarked).
    for tuned in (fused._nat2d_fwd_tuned, fused._nat2d_bwd_dkdv_tuned, fused._nat2d_bwd_dq_tuned):
        assert len(tuned.configs) == 1
    # On a GPU: the dtype's own list, owned blocks dividing the grid width, tiles that fit.
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    tuned = fused._tuned(fused._nat2d_fwd_kernel, "BLOCK_M", "BLOCK_N", False, fused._FWD_CONFIGS)
    bf16, fp32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0)
    keep = lambda q, width, block_d: _configs(fused._fits(tuned.configs, {"Q": q, "GW": width},  # noqa: E731
                                                          BLOCK_D=block_d))
    assert keep(bf16, 64, 128) == sorted(fused._FWD_CONFIGS[2])
    assert keep(fp32, 64, 128) == sorted(fused._FWD_CONFIGS[4])
    assert keep(fp32, 48, 128) == [(16, 4, 2)]                         # 48: only 16 divides
    assert keep(bf16, 48, 128) == sorted(fused._FWD_CONFIGS[2])       # none divides: all
    assert keep(bf16, 64, 256) == [(32, 4, 2), (64, 8, 2)]            # 64 x 256 needs 8 warps


def test_sweeps_are_local():
    # DiT-XL/2 (16x16, k=7): a 16-query row block sweeps 7 key rows of one 16-key chunk;
    # a 16-key block is reached from the 10 query rows of its inverse neighbourhood.
    assert _sweep(16, 16, 7, 16, 16, False) == (7, 1)
    assert _sweep(16, 16, 7, 16, 16, True) == (10, 1)
    # PixArt at 2048px (128x128): the sweep does not grow with the grid.
    assert _sweep(128, 128, 7, 64, 16, False) == (7, 5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid=(4, 4)), "grid"),
    (dict(grid=(5,)), "grid"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
])
def test_invalid_arguments(kwargs, match):
    q, k, v = _inputs(1, 1, 20, 4, torch.float32)
    args = dict(grid=(4, 5), kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        neighborhood_attention_2d(q, k, v, **args)


def test_invalid_tensors():
    q, k, v = _inputs(1, 1, 20, 4, torch.float32)
    with pytest.raises(ValueError, match="4-D"):
        neighborhood_attention_2d(q[0], k, v, (4, 5))
    with pytest.raises(ValueError, match="shape"):
        neighborhood_attention_2d(q, k[:, :, :10], v, (4, 5))
    with pytest.raises(ValueError, match="dtype"):
        neighborhood_attention_2d(q, k.half(), v, (4, 5))


# Compiling for an H100 needs no GPU: Triton lowers to PTX and runs its bundled ptxas. This
# proves the kernels are real GPU Triton, not only interpreter-runnable code.
_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import graftfx
from graftfx.kernels import _attention
from graftfx.kernels.{op} import fused

FLOATS = ("qk_scale", "sm_scale")
TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
for name, consts, warps in {specs}:
    fn = getattr(fused, name, None) or getattr(_attention, name)
    sig = {{a: "constexpr" if a in consts else "fp32" if a in FLOATS else
           "*fp32" if a in ("LSE", "DLSE", "DELTA") else "*bf16" if a in TENSORS else "i32"
           for a in fn.arg_names}}
    src = ASTSource(fn, sig, constexprs={{(fn.arg_names.index(k),): v for k, v in consts.items()}})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=2))
    assert "mma" in kernel.asm["ptx"] or "delta" in name, name + ": no tensor-core mma"
    print(name, "ok")
"""


def _compile_for_h100(op: str, specs: list) -> None:
    root = Path(graftfx.__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    code = _AOT_SCRIPT.format(op=op, specs=repr(specs))
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("Triton's bundled ptxas is unavailable")
    assert run.returncode == 0, run.stderr[-3000:]


def test_kernels_compile_for_h100():
    blocks = dict(BLOCK_D=128, HEAD_DIM=72, ALIGN=8, PRECISION="tf32", UPCAST=False)
    _compile_for_h100("nat2d", [   # DiT-XL/2: 16x16 grid, k=7, head dim 72 -> BLOCK_D 128
        ("_nat2d_fwd_kernel", dict(BLOCK_M=16, BLOCK_N=16, N_ROWS=7, N_COLS=1, **blocks), 8),
        ("bwd_delta_kernel", dict(BLOCK_M=16, BLOCK_D=128, HEAD_DIM=72, ALIGN=8, HAS_DLSE=False), 4),
        ("_nat2d_bwd_dkdv_kernel", dict(BLOCK_M=16, BLOCK_N=16, N_ROWS=10, N_COLS=1, **blocks), 8),
        ("_nat2d_bwd_dq_kernel", dict(BLOCK_M=16, BLOCK_N=16, N_ROWS=7, N_COLS=1, **blocks), 8),
    ])
