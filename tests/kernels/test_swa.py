"""Sliding-window attention: Triton kernels (interpreter) and custom op vs the fp32 reference."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graftfx

from graftfx.kernels._dispatch import kernels
from graftfx.kernels.swa import (flash_attn_available, naive_swa, naive_swa_bwd,
                                 sliding_window_attention, swa_bwd, swa_fwd, swa_mask)
from graftfx.kernels.swa import fused
from graftfx.kernels.swa.fused import _n_iters
from graftfx.kernels.testing import OPCHECK_UTILS, TOL, assert_rel_close, record_calls

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

# (B, H, L, Dh, window, block_m, block_n, with_dlse); None blocks = the launchers' defaults.
LAUNCHER_CASES = [
    pytest.param(1, 2, 63, 60, 4, None, None, True, id="B1-T63-H2-D60-w4"),
    pytest.param(3, 1, 63, 16, 100, None, None, False, id="B3-T63-H1-D16-w100>L"),
    pytest.param(1, 1, 255, 16, 4, None, None, True, id="B1-T255-H1-D16-w4"),
    pytest.param(1, 1, 255, 16, 20, 32, 32, False, id="B1-T255-H1-D16-w20-blk32"),
]


def _inputs(B, H, L, D, dtype):
    return [torch.randn(B, H, L, D).to(dtype) for _ in range(3)]


def _reference(q, k, v, window, do, dlse, scale=None):
    """fp32 reference outputs and autograd gradients on fp32 copies of the inputs."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    o, lse = naive_swa(qf, kf, vf, window, scale)
    outs, grads = [o], [do.float()]
    if dlse is not None:
        outs.append(lse)
        grads.append(dlse)
    dq, dk, dv = torch.autograd.grad(outs, (qf, kf, vf), grads)
    return o.detach(), lse.detach(), dq, dk, dv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,L,D,window,block_m,block_n,with_dlse", LAUNCHER_CASES)
def test_launchers_match_reference(B, H, L, D, window, block_m, block_n, with_dlse, dtype):
    q, k, v = _inputs(B, H, L, D, dtype)
    do = torch.randn(B, H, L, D).to(dtype)
    dlse = torch.randn(B, H, L) if with_dlse else None
    o, lse = swa_fwd(q, k, v, window, block_m=block_m, block_n=block_n)
    assert o.dtype == dtype and lse.dtype == torch.float32
    dq, dk, dv = swa_bwd(do, q, k, v, o, lse, window, dlse=dlse,
                         block_m=block_m, block_n=block_n)
    ref = _reference(q, k, v, window, do, dlse)
    tol = TOL[dtype]
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), ref):
        assert got.dtype == (torch.float32 if name == "lse" else dtype), name
        assert_rel_close(name, got.float(), want, tol)


def test_launchers_fp16():
    test_launchers_match_reference(3, 2, 63, 60, 4, None, None, True, torch.float16)


def test_launchers_accept_strided_views():
    # q, k, v as the operator makes them: views into one packed (B, L, 3, H, Dh) projection.
    B, L, H, D, window = 2, 40, 2, 24, 3
    qkv = torch.randn(B, L, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    do = torch.randn(B, L, H, D).transpose(1, 2)
    o, lse = swa_fwd(q, k, v, window)
    dq, dk, dv = swa_bwd(do, q, k, v, o, lse, window)
    ref = _reference(q, k, v, window, do, None)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), ref):
        assert_rel_close(name, got, want, TOL[torch.float32])


def test_reference_backward_matches_autograd():
    B, H, L, D, window = 2, 2, 37, 12, 5
    q, k, v = _inputs(B, H, L, D, torch.float32)
    do, dlse = torch.randn(B, H, L, D), torch.randn(B, H, L)
    want = _reference(q, k, v, window, do, dlse)[2:]
    got = naive_swa_bwd(do, dlse, q, k, v, window)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_rel_close(name, g, w, 1e-6)


def test_mask_is_the_window():
    m = swa_mask(10, 2)
    assert m.sum(1).tolist() == [3, 4, 5, 5, 5, 5, 5, 5, 4, 3]
    assert m[4, 2] and m[4, 6] and not m[4, 1] and not m[4, 7]
    assert swa_mask(10, 10).all()


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,L,D,window,scale", [
    pytest.param(3, 2, 63, 60, 4, None, id="B3-T63-H2-D60-w4"),
    # a custom scale: the op must hand it to both kernels (the launcher tests use the default)
    pytest.param(1, 1, 63, 16, 64, 0.3, id="B1-T63-H1-D16-w64>L-s0.3"),
])
def test_custom_op_autograd(B, H, L, D, window, scale, dtype, path, monkeypatch):
    calls = record_calls(monkeypatch, fused.swa_fwd, fused.swa_bwd)
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, L, D, dtype))
    do, dlse = torch.randn(B, H, L, D).to(dtype), torch.randn(B, H, L)
    with kernels(path):
        o, lse = sliding_window_attention(q, k, v, window, scale=scale, return_lse=True)
        dq, dk, dv = torch.autograd.grad((o, lse), (q, k, v), (do, dlse))
    assert calls == (["swa_fwd", "swa_bwd"] if path == "triton" else [])
    ref = _reference(q, k, v, window, do, dlse, scale)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), ref):
        assert got.dtype == (torch.float32 if name == "lse" else dtype), name
        assert_rel_close(name, got.float(), want, TOL[dtype])


def test_reference_backend_is_plain_pytorch(monkeypatch):
    # backend="reference" bypasses the custom op: no kernel runs even in Triton mode, and the
    # result is the reference with its autograd (custom scale included).
    calls = record_calls(monkeypatch, fused.swa_fwd, fused.swa_bwd)
    q, k, v = (t.requires_grad_() for t in _inputs(2, 2, 30, 8, torch.float32))
    do = torch.randn(2, 2, 30, 8)
    with kernels("triton"):
        o, lse = sliding_window_attention(q, k, v, window=3, scale=0.3, backend="reference",
                                          return_lse=True)
        grads = torch.autograd.grad(o, (q, k, v), do)
    assert calls == []
    ref = _reference(q, k, v, 3, do, None, 0.3)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), ref):
        assert_rel_close(name, got, want, 1e-6)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_opcheck(path, monkeypatch):
    # Schema, fakes and autograd registration of both ops on the path named (in Triton mode
    # the interpreter runs the kernels inside every check), plus AOT dispatch on the reference.
    calls = record_calls(monkeypatch, fused.swa_fwd, fused.swa_bwd)
    utils = OPCHECK_UTILS[path]
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 20, 8, torch.float32))
    with kernels(path):
        torch.library.opcheck(torch.ops.graftfx.swa.default, (q, k, v, 3, 0.35), test_utils=utils)
        o, lse = torch.ops.graftfx.swa(q.detach(), k.detach(), v.detach(), 3, 0.35)
        do, dlse = torch.randn_like(o), torch.randn_like(lse)
        torch.library.opcheck(torch.ops.graftfx.swa_bwd.default,
                              (do, dlse, q.detach(), k.detach(), v.detach(), o, lse, 3, 0.35),
                              test_utils=utils)
    assert ({"swa_fwd", "swa_bwd"} <= set(calls)) if path == "triton" else calls == []


def test_compiles_without_graph_breaks(monkeypatch):
    # One fullgraph trace, run on the Triton path and checked against the fp32 reference: the
    # compiled graph must call the same op (and its backward op) as eager mode.
    calls = record_calls(monkeypatch, fused.swa_fwd, fused.swa_bwd)
    B, H, L, D, window = 1, 2, 37, 12, 2
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, L, D, torch.float32))
    w_o, w_lse = torch.randn(B, H, L, D), torch.randn(B, H, L)

    def f(q, k, v):
        o, lse = sliding_window_attention(q, k, v, window=window, scale=0.4, return_lse=True)
        return (o * w_o).sum() + (lse * w_lse).sum()

    torch._dynamo.reset()
    with kernels("triton"):
        loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
    assert calls == ["swa_fwd", "swa_bwd"]
    o, lse, *want = _reference(q, k, v, window, w_o, w_lse, 0.4)
    assert_rel_close("loss", loss, (o * w_o).sum() + (lse * w_lse).sum(), TOL[torch.float32])
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert_rel_close(name, g, w, TOL[torch.float32])


def test_block_skipping_trip_count():
    # A query block sweeps only the key blocks its window touches, however long the sequence.
    assert _n_iters(4096, 4, 64, 16) == 6
    assert _n_iters(16384, 4, 64, 16) == 6
    assert _n_iters(256, 1000, 64, 64) == 4  # window beyond L: the whole row, no more


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=-1), "window"),
    (dict(window=2.5), "window"),
    (dict(backend="cuda"), "backend"),
])
def test_invalid_arguments(kwargs, match):
    q, k, v = _inputs(1, 1, 8, 4, torch.float32)
    with pytest.raises(ValueError, match=match):
        sliding_window_attention(q, k, v, **kwargs)


def test_invalid_tensors():
    q, k, v = _inputs(1, 1, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="4-D"):
        sliding_window_attention(q[0], k, v)
    with pytest.raises(ValueError, match="shape"):
        sliding_window_attention(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="dtype"):
        sliding_window_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        sliding_window_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="block_m"):
        swa_fwd(q, k, v, 2, block_m=24)


@pytest.mark.skipif(flash_attn_available(), reason="flash_attn is installed here")
def test_flash_attn_backend_absent_is_a_clear_error():
    q, k, v = _inputs(1, 1, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="flash_attn"):
        sliding_window_attention(q, k, v, backend="flash_attn")


@pytest.mark.skipif(not (flash_attn_available() and torch.cuda.is_available()),
                    reason="needs flash_attn and a GPU")
def test_flash_attn_backend_matches_reference():
    q, k, v = (torch.randn(2, 4, 255, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    got = sliding_window_attention(q, k, v, window=4, backend="flash_attn")
    assert_rel_close("o", got.float(), naive_swa(q, k, v, 4)[0], TOL[torch.bfloat16])


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
    _compile_for_h100("swa", [
        ("_swa_fwd_kernel", dict(BLOCK_M=64, BLOCK_N=16, N_ITERS=6, **blocks), 8),
        ("bwd_delta_kernel", dict(BLOCK_M=64, BLOCK_D=128, HEAD_DIM=72, ALIGN=8, HAS_DLSE=True), 4),
        ("_swa_bwd_dkdv_kernel", dict(BLOCK_M=16, BLOCK_N=64, N_ITERS=6, **blocks), 8),
        ("_swa_bwd_dq_kernel", dict(BLOCK_M=64, BLOCK_N=16, N_ITERS=6, **blocks), 8),
    ])
