"""Non-causal (bidirectional) linear attention in Triton, as the custom op ``graftfx::linear_attn``.

    o_i = phi(q_i) S / (phi(q_i) . z + eps),   S = sum_j phi(k_j)^T v_j,   z = sum_j phi(k_j)

q, k: (B, H, L, Dk), v: (B, H, L, Dv), any strides with a unit last stride. The cost is
O(L Dk Dv): nothing L x L exists. The file reads top to bottom: feature maps, Triton kernels,
launchers ``linear_attn_fwd`` / ``linear_attn_bwd``, custom ops + autograd, public function.

Forward:  1. ``_state_kernel``: per (batch*head, L-chunk, Dv-block) partial S and z in fp32; the
             chunks are summed in a second, atomic-free stage (a plain tensor sum), and S is
             then rounded once to the dtype the tensor cores take.
          2. ``_fwd_out_kernel``: per (batch*head, query block, Dv-block) output rows.
Backward (S, z recomputed: two (Dk, Dv) states are cheaper to rebuild than to keep; o unused):
          1. ``_state_kernel`` as in the forward.
          2. ``_bwd_q_kernel``: dq, plus per-row 1/den and -delta/den with delta_i = do_i . o_i
             = phi(q_i) . (do_i S^T) / den_i.
          3. ``_state_kernel`` again: dS = sum_i phi(q_i)^T do_i / den_i and
             dz = -sum_i phi(q_i) delta_i / den_i, chunked and summed the same way.
          4. ``_bwd_kv_kernel``: dk = (v dS^T + dz) * phi'(k) and dv = phi(k) dS.
Every product accumulates in fp32; tiles enter ``tl.dot`` in the input dtype (fp32 inputs use
3xTF32, accurate to fp32 rounding), and loads/stores use the tensors' own dtypes.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._attention import align, strides, unit_last
from .._dispatch import interpreting, num_sms, on_device, use_triton
from .naive import FEATURE_MAPS, linear_attn_bwd_ref, linear_attn_ref

MAX_HEAD_DIM = 256   # the whole Dk axis of a tile lives in registers
_FEATURE_IDS = {name: i for i, name in enumerate(FEATURE_MAPS)}   # elu -> 0, relu -> 1


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    if FEATURE == 0:   # elu(x) + 1
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:              # relu(x)
        return tl.maximum(x, 0.0)


@triton.jit
def _phi_grad(x, FEATURE: tl.constexpr):
    if FEATURE == 0:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        return tl.where(x > 0, 1.0, 0.0)


@triton.jit
def _dot(a, b, OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32, the tiles rounded to OPERAND first (the input dtype on a GPU:
    bf16/fp16 tensor cores, or 3xTF32 for fp32). The interpreter cannot multiply bf16 (numpy has
    no bfloat16) and truncates fp32 -> bf16, so there OPERAND is fp32 for bf16 inputs."""
    return tl.dot(a.to(OPERAND), b.to(OPERAND), input_precision=PRECISION)


@triton.jit
def _state_kernel(X, Y, ROW_SCALE, ROW_WEIGHT, S_PART, Z_PART,
                  sxb, sxh, sxl, syb, syh, syl,
                  H, L, NUM_CHUNKS,
                  DK: tl.constexpr, DV: tl.constexpr, CHUNK: tl.constexpr,
                  HAS_ROWS: tl.constexpr, FEATURE: tl.constexpr,
                  OPERAND: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
                  BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """One L-chunk of S = phi(X)^T (r * Y) and z = sum_l w_l phi(X_l).

    r, w are per-row fp32 factors (HAS_ROWS) or 1. Grid: (B*H, NUM_CHUNKS, cdiv(DV, BLOCK_V)).
    Writes the fp32 partials S_PART[bh, chunk] (DK, DV) and Z_PART[bh, chunk] (DK,).
    """
    sxb, sxh, sxl = sxb * ALIGN, sxh * ALIGN, sxl * ALIGN     # strides in units of ALIGN
    syb, syh, syl = syb * ALIGN, syh * ALIGN, syl * ALIGN
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    x_base = X + b * sxb + h * sxh
    y_base = Y + b * syb + h * syh
    row_base = pid_bh.to(tl.int64) * L

    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < DK
    mask_v = offs_v < DV

    acc = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    z = tl.zeros((BLOCK_K,), dtype=tl.float32)
    start = pid_c * CHUNK
    for l0 in range(0, CHUNK, BLOCK_L):   # CHUNK is a multiple of BLOCK_L; the last chunk is ragged
        offs_l = start + l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        # phi(X) loaded transposed, (BLOCK_K, BLOCK_L). Rows past L must give 0, not phi(0) = 1;
        # padded Dk columns are never stored.
        xt = tl.load(x_base + offs_l[None, :] * sxl + offs_k[:, None],
                     mask=mask_k[:, None] & mask_l[None, :], other=0.0)
        fxt = tl.where(mask_l[None, :], _phi(xt.to(tl.float32), FEATURE), 0.0)
        y = tl.load(y_base + offs_l[:, None] * syl + offs_v[None, :],
                    mask=mask_l[:, None] & mask_v[None, :], other=0.0)
        if HAS_ROWS:
            r = tl.load(ROW_SCALE + row_base + offs_l, mask=mask_l, other=0.0)
            w = tl.load(ROW_WEIGHT + row_base + offs_l, mask=mask_l, other=0.0)
            y = y.to(tl.float32) * r[:, None]
            z += tl.sum(fxt * w[None, :], axis=1)
        else:
            z += tl.sum(fxt, axis=1)
        acc += _dot(fxt, y, OPERAND, PRECISION)

    part = pid_bh.to(tl.int64) * NUM_CHUNKS + pid_c
    s_ptrs = S_PART + (part * DK + offs_k[:, None]) * DV + offs_v[None, :]
    tl.store(s_ptrs, acc, mask=mask_k[:, None] & mask_v[None, :])
    tl.store(Z_PART + part * DK + offs_k, z, mask=mask_k & (pid_v == 0))


@triton.jit
def _fwd_out_kernel(Q, S, Z, O,
                    sqb, sqh, sql, sob, soh, sol,
                    H, L, eps,
                    DK: tl.constexpr, DV: tl.constexpr,
                    FEATURE: tl.constexpr, OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                    ALIGN: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """o = phi(q) S / (phi(q) . z + eps) for one query block and Dv-block.

    Grid: (B*H, cdiv(L, BLOCK_L), cdiv(DV, BLOCK_V)); S (B*H, DK, DV) in the OPERAND dtype,
    z (B*H, DK) in fp32.
    """
    sqb, sqh, sql = sqb * ALIGN, sqh * ALIGN, sql * ALIGN
    sob, soh, sol = sob * ALIGN, soh * ALIGN, sol * ALIGN
    pid_bh = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_l = offs_l < L
    mask_k = offs_k < DK
    mask_v = offs_v < DV

    q_mask = mask_l[:, None] & mask_k[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_l[:, None] * sql + offs_k[None, :], mask=q_mask, other=0.0)
    # Padding needs no masking here: phi(0) may be 1, but padded Dk columns meet zero rows of
    # S and zero entries of z, and padded rows are never stored.
    fq = _phi(q.to(tl.float32), FEATURE)
    z = tl.load(Z + pid_bh.to(tl.int64) * DK + offs_k, mask=mask_k, other=0.0)
    den = tl.sum(fq * z[None, :], axis=1) + eps

    s_ptrs = S + (pid_bh.to(tl.int64) * DK + offs_k[:, None]) * DV + offs_v[None, :]
    s = tl.load(s_ptrs, mask=mask_k[:, None] & mask_v[None, :], other=0.0)
    num = _dot(fq, s, OPERAND, PRECISION)
    o = num / den[:, None]
    o_ptrs = O + b * sob + h * soh + offs_l[:, None] * sol + offs_v[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=mask_l[:, None] & mask_v[None, :])


@triton.jit
def _bwd_q_kernel(Q, DO, S, Z, DQ, RDEN, G,
                  sqb, sqh, sql, sdob, sdoh, sdol, sdqb, sdqh, sdql,
                  H, L, eps,
                  DK: tl.constexpr, DV: tl.constexpr,
                  FEATURE: tl.constexpr, OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                  ALIGN: tl.constexpr,
                  BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """dq = (u - delta z) / den * phi'(q) with u = do S^T and delta_i = do_i . o_i; also writes
    1/den and -delta/den per row for the dS pass.

    delta_i = phi(q_i) . u_i / den_i, so the forward output o is never read. Grid:
    (B*H, cdiv(L, BLOCK_L)); loops over Dv in BLOCK_V tiles. RDEN, G: (B*H, L) fp32.
    """
    sqb, sqh, sql = sqb * ALIGN, sqh * ALIGN, sql * ALIGN
    sdob, sdoh, sdol = sdob * ALIGN, sdoh * ALIGN, sdol * ALIGN
    sdqb, sdqh, sdql = sdqb * ALIGN, sdqh * ALIGN, sdql * ALIGN
    pid_bh = tl.program_id(0)
    pid_l = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, BLOCK_K)
    mask_l = offs_l < L
    mask_k = offs_k < DK

    do_base = DO + b * sdob + h * sdoh
    s_base = S + pid_bh.to(tl.int64) * DK * DV
    u = tl.zeros((BLOCK_L, BLOCK_K), dtype=tl.float32)
    for v0 in range(0, DV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < DV
        do = tl.load(do_base + offs_l[:, None] * sdol + offs_v[None, :],
                     mask=mask_l[:, None] & mask_v[None, :], other=0.0)
        s = tl.load(s_base + offs_k[:, None] * DV + offs_v[None, :],
                    mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        u += _dot(do, tl.trans(s), OPERAND, PRECISION)

    # q only after the loop: nothing but the accumulator stays live through it
    q_mask = mask_l[:, None] & mask_k[None, :]
    qf = tl.load(Q + b * sqb + h * sqh + offs_l[:, None] * sql + offs_k[None, :],
                 mask=q_mask, other=0.0).to(tl.float32)
    fq = _phi(qf, FEATURE)   # padding: as in _fwd_out_kernel (u's padded columns are 0 too)
    z = tl.load(Z + pid_bh.to(tl.int64) * DK + offs_k, mask=mask_k, other=0.0)
    rden = 1.0 / (tl.sum(fq * z[None, :], axis=1) + eps)
    delta = tl.sum(fq * u, axis=1) * rden
    dq = (u - delta[:, None] * z[None, :]) * rden[:, None] * _phi_grad(qf, FEATURE)
    dq_ptrs = DQ + b * sdqb + h * sdqh + offs_l[:, None] * sdql + offs_k[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)
    row = pid_bh.to(tl.int64) * L + offs_l
    tl.store(RDEN + row, rden, mask=mask_l)
    tl.store(G + row, -delta * rden, mask=mask_l)


@triton.jit
def _bwd_kv_kernel(K, V, DS, DZ, DK_OUT, DV_OUT,
                   skb, skh, skl, svb, svh, svl, sdkb, sdkh, sdkl, sdvb, sdvh, sdvl,
                   H, L,
                   DK: tl.constexpr, DV: tl.constexpr,
                   FEATURE: tl.constexpr, OPERAND: tl.constexpr, PRECISION: tl.constexpr,
                   ALIGN: tl.constexpr,
                   BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """dk = (v dS^T + dz) * phi'(k), dv = phi(k) dS for one key block.

    Grid: (B*H, cdiv(L, BLOCK_L)); loops over Dv in BLOCK_V tiles. dS (B*H, DK, DV) in the
    OPERAND dtype, dz (B*H, DK) in fp32.
    """
    skb, skh, skl = skb * ALIGN, skh * ALIGN, skl * ALIGN
    svb, svh, svl = svb * ALIGN, svh * ALIGN, svl * ALIGN
    sdkb, sdkh, sdkl = sdkb * ALIGN, sdkh * ALIGN, sdkl * ALIGN
    sdvb, sdvh, sdvl = sdvb * ALIGN, sdvh * ALIGN, sdvl * ALIGN
    pid_bh = tl.program_id(0)
    pid_l = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, BLOCK_K)
    mask_l = offs_l < L
    mask_k = offs_k < DK

    k_mask = mask_l[:, None] & mask_k[None, :]
    k = tl.load(K + b * skb + h * skh + offs_l[:, None] * skl + offs_k[None, :], mask=k_mask, other=0.0)
    # reused for every Dv tile; padded Dk columns meet zero rows of dS, padded rows are not stored
    fk = _phi(k.to(tl.float32), FEATURE).to(OPERAND)
    dz = tl.load(DZ + pid_bh.to(tl.int64) * DK + offs_k, mask=mask_k, other=0.0)

    v_base = V + b * svb + h * svh
    dv_base = DV_OUT + b * sdvb + h * sdvh
    ds_base = DS + pid_bh.to(tl.int64) * DK * DV
    acc = tl.zeros((BLOCK_L, BLOCK_K), dtype=tl.float32)
    for v0 in range(0, DV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < DV
        lv_mask = mask_l[:, None] & mask_v[None, :]
        v = tl.load(v_base + offs_l[:, None] * svl + offs_v[None, :], mask=lv_mask, other=0.0)
        ds = tl.load(ds_base + offs_k[:, None] * DV + offs_v[None, :],
                     mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        acc += _dot(v, tl.trans(ds), OPERAND, PRECISION)
        dv = _dot(fk, ds, OPERAND, PRECISION)
        tl.store(dv_base + offs_l[:, None] * sdvl + offs_v[None, :],
                 dv.to(DV_OUT.dtype.element_ty), mask=lv_mask)

    dk = (acc + dz[None, :]) * _phi_grad(k.to(tl.float32), FEATURE)
    dk_ptrs = DK_OUT + b * sdkb + h * sdkh + offs_l[:, None] * sdkl + offs_k[None, :]
    tl.store(dk_ptrs, dk.to(DK_OUT.dtype.element_ty), mask=k_mask)


# ----------------------------------------------------------------------------------------------
# Launchers: plain functions, tensors in and out.


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _config(q: torch.Tensor, dv: int) -> tuple[dict, torch.dtype]:
    """Kernel meta-parameters for inputs like q that no autotuning changes, and the dtype of
    the tiles fed to tl.dot.

    The Dk axis is whole (a power of two >= 16: tl.dot); BLOCK_L, BLOCK_V, warps and stages are
    autotuned (``_tuned``). Operands: q's dtype (bf16/fp16 tensor cores; 3xTF32 for fp32,
    accurate to fp32 rounding), except bf16 under the interpreter, which gets fp32 tiles (see
    ``_dot``).
    """
    dk = q.shape[-1]
    operand = torch.float32 if (q.dtype == torch.bfloat16 and interpreting()) else q.dtype
    meta = dict(DK=dk, DV=dv, BLOCK_K=max(16, triton.next_power_of_2(dk)),
                OPERAND=_TL_DTYPES[operand], PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32")
    return meta, operand


# Autotuned launch configurations (BLOCK_L, BLOCK_V, warps, stages[, largest BLOCK_K]), per
# kernel and per element size (2: bf16/fp16, 4: fp32, whose 3xTF32 dots split every operand in
# two and take about twice the registers); BLOCK_V is capped at DV's power of two. ``_fits`` keeps
# the dtype's configs allowed at this BLOCK_K whose (BLOCK_L, BLOCK_K) and (BLOCK_K, BLOCK_V)
# tiles stay within 128 bytes per thread. Every config kept compiles without spills for sm_90 at
# head dims 64 and 72, bf16 and fp32 (benchmarks/kernel_static.py; tests/kernels/test_static.py
# checks bf16): the lists are that report's survivors (fp32 ``_bwd_kv_kernel`` at BLOCK_K 128
# spilled 100 bytes to 1.7 KB in every 32-row config; its (16, 32) tile at 8 warps loaded v
# 64 bits wide). Under the interpreter there is one small config: CPU runs never benchmark.
# The state pass's CHUNK is a multiple of ``_CHUNK_UNIT``, so of every BLOCK_L.
_CHUNK_UNIT = 64
_CONFIGS = {
    "state": {2: [(64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3), (32, 32, 4, 3)],
              4: [(32, 64, 8, 3), (64, 32, 8, 3), (32, 32, 4, 3), (64, 64, 8, 3)]},
    "fwd_out": {2: [(64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (32, 64, 4, 3)],
                4: [(32, 64, 8, 3), (64, 32, 8, 3), (64, 64, 8, 3), (16, 64, 4, 3)]},
    "bwd_q": {2: [(64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3), (32, 32, 4, 3)],
              4: [(32, 64, 8, 3), (64, 32, 8, 3), (32, 32, 4, 3), (16, 64, 4, 3)]},
    "bwd_kv": {2: [(64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3), (128, 64, 8, 3)],
               4: [(32, 64, 8, 2, 64), (16, 64, 4, 2, 64), (16, 32, 4, 2)]},
}


def _fits(configs, named_args, **kwargs):
    elem = next(t for t in named_args.values() if isinstance(t, torch.Tensor)).element_size()
    bk = kwargs["BLOCK_K"]
    mine = [c for c in configs if c.elem == min(elem, 4) and bk <= c.max_bk] or configs
    keep = [c for c in mine
            if max(c.kwargs["BLOCK_L"], c.kwargs["BLOCK_V"]) * bk * elem <= 128 * 32 * c.num_warps]
    return keep or [min(mine, key=lambda c: (c.kwargs["BLOCK_L"] * c.kwargs["BLOCK_V"], -c.num_warps))]


def _tuned(kernel, configs: dict, key: list[str]):
    """``kernel`` autotuned over ``configs`` ({element size: [(BLOCK_L, BLOCK_V, warps,
    stages[, largest BLOCK_K])]}), keyed on ``key`` and the dtypes; BLOCK_V is capped at DV's
    power of two."""
    if interpreting():
        cfgs = [triton.Config({"BLOCK_L": 64, "BLOCK_V": 64}, num_warps=4, num_stages=1)]
    else:
        cfgs = []
        for elem, rows in configs.items():
            for bl, bv, warps, stages, *max_bk in rows:
                c = triton.Config({"BLOCK_L": bl, "BLOCK_V": bv}, num_warps=warps, num_stages=stages)
                c.elem, c.max_bk = elem, (max_bk or [MAX_HEAD_DIM])[0]
                cfgs.append(c)
    heur = triton.heuristics({
        "BLOCK_V": lambda a: max(16, min(a["BLOCK_V"], triton.next_power_of_2(a["DV"]))),
    })(kernel)
    return triton.autotune(cfgs, key=key, prune_configs_by={"early_config_prune": _fits})(heur)


_state_tuned = _tuned(_state_kernel, _CONFIGS["state"], ["DK", "DV", "CHUNK", "HAS_ROWS"])
_fwd_out_tuned = _tuned(_fwd_out_kernel, _CONFIGS["fwd_out"], ["DK", "DV", "L"])
_bwd_q_tuned = _tuned(_bwd_q_kernel, _CONFIGS["bwd_q"], ["DK", "DV", "L"])
_bwd_kv_tuned = _tuned(_bwd_kv_kernel, _CONFIGS["bwd_kv"], ["DK", "DV", "L"])


def _chunking(L: int, programs: int, device: torch.device) -> tuple[int, int]:
    """Split L into chunks so the state pass fills about 2 waves of the GPU.

    A chunk is a power-of-two number of ``_CHUNK_UNIT`` blocks: it is a compile-time constant
    of the kernel (a static loop pipelines well), so only a few variants are ever compiled.
    """
    blocks = triton.cdiv(L, _CHUNK_UNIT)
    want = max(1, min(blocks, triton.cdiv(2 * num_sms(device), programs)))
    chunk = triton.next_power_of_2(triton.cdiv(blocks, want)) * _CHUNK_UNIT
    return chunk, triton.cdiv(L, chunk)


def _state(x, y, rows, feature_id, meta, operand, a):
    """S = phi(x)^T (r * y) in the operand dtype and z = sum_l w_l phi(x_l) in fp32, per
    (batch, head); rows = (r, w), fp32 (B*H, L), or None for r = w = 1."""
    B, H, L, dk = x.shape
    dv = y.shape[-1]
    chunk, nc = _chunking(L, B * H * triton.cdiv(dv, 64), x.device)
    s_part = torch.empty(B * H, nc, dk, dv, device=x.device, dtype=torch.float32)
    z_part = torch.empty(B * H, nc, dk, device=x.device, dtype=torch.float32)
    r, w = rows if rows is not None else (z_part, z_part)   # not read when HAS_ROWS is False
    with on_device(x):
        _state_tuned[lambda m: (B * H, nc, triton.cdiv(dv, m["BLOCK_V"]))](
            x, y, r, w, s_part, z_part, *strides(x, a), *strides(y, a),
            H, L, nc, CHUNK=chunk, ALIGN=a, HAS_ROWS=rows is not None, FEATURE=feature_id, **meta)
    if nc == 1:
        return s_part[:, 0].to(operand), z_part[:, 0]
    # stage 2 of the atomic-free reduction; S is rounded once, as every tile of it would be
    return s_part.sum(dim=1).to(operand), z_part.sum(dim=1)


def linear_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    feature_map: str = "elu", eps: float = 1e-6) -> torch.Tensor:
    """Triton forward; q, k (B, H, L, Dk), v (B, H, L, Dv) -> o (B, H, L, Dv) in q's dtype."""
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    B, H, L, _ = q.shape
    dv = v.shape[-1]
    fid = _FEATURE_IDS[feature_map]
    meta, operand = _config(q, dv)
    o = torch.empty(B, H, L, dv, device=q.device, dtype=q.dtype)
    a = align(q, k, v, o)
    with on_device(q):
        s, z = _state(k, v, None, fid, meta, operand, a)
        grid = lambda m: (B * H, triton.cdiv(L, m["BLOCK_L"]), triton.cdiv(dv, m["BLOCK_V"]))  # noqa: E731
        _fwd_out_tuned[grid](
            q, s, z, o, *strides(q, a), *strides(o, a),
            H, L, float(eps), FEATURE=fid, ALIGN=a, **meta,
        )
    return o


def linear_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    feature_map: str = "elu", eps: float = 1e-6):
    """Triton backward: (dq, dk, dv) in the dtypes of (q, k, v) given do = dL/do; the forward
    output is not needed (it is recomputed implicitly from S and z)."""
    do, q, k, v = unit_last(do), unit_last(q), unit_last(k), unit_last(v)
    B, H, L, _ = q.shape
    dv = v.shape[-1]
    fid = _FEATURE_IDS[feature_map]
    meta, operand = _config(q, dv)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk_ = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv_ = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    rden = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
    g = torch.empty(B * H, L, device=q.device, dtype=torch.float32)
    grid = lambda m: (B * H, triton.cdiv(L, m["BLOCK_L"]))  # noqa: E731
    a = align(do, q, k, v, dq, dk_, dv_)
    with on_device(q):
        s, z = _state(k, v, None, fid, meta, operand, a)
        _bwd_q_tuned[grid](
            q, do, s, z, dq, rden, g, *strides(q, a), *strides(do, a), *strides(dq, a),
            H, L, float(eps), FEATURE=fid, ALIGN=a, **meta,
        )
        ds, dz = _state(q, do, (rden, g), fid, meta, operand, a)
        _bwd_kv_tuned[grid](
            k, v, ds, dz, dk_, dv_, *strides(k, a), *strides(v, a), *strides(dk_, a), *strides(dv_, a),
            H, L, FEATURE=fid, ALIGN=a, **meta,
        )
    return dq, dk_, dv_


# ----------------------------------------------------------------------------------------------
# Custom ops + autograd: graph-break-free under torch.compile.


@torch.library.custom_op("graftfx::linear_attn", mutates_args=())
def linear_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   feature_map: str, eps: float) -> torch.Tensor:
    if use_triton(q):
        return linear_attn_fwd(q, k, v, feature_map, eps)
    return linear_attn_ref(q, k, v, feature_map, eps)


@linear_attn_op.register_fake
def _(q, k, v, feature_map, eps):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("graftfx::linear_attn_bwd", mutates_args=())
def linear_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       feature_map: str, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return linear_attn_bwd(do, q, k, v, feature_map, eps)
    return linear_attn_bwd_ref(do, q, k, v, feature_map, eps)


@linear_attn_bwd_op.register_fake
def _(do, q, k, v, feature_map, eps):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, feature_map, eps = inputs
    ctx.save_for_backward(q, k, v)   # the backward does not need the output
    ctx.feature_map, ctx.eps = feature_map, eps


def _backward(ctx, do):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = linear_attn_bwd_op(do, q, k, v, ctx.feature_map, ctx.eps)
    return dq, dk, dv, None, None


linear_attn_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function.


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     feature_map: str = "elu", eps: float = 1e-6) -> torch.Tensor:
    """Non-causal linear attention: q, k (B, H, L, Dk), v (B, H, L, Dv) -> (B, H, L, Dv).

    ``feature_map``: "elu" (elu(x) + 1, default) or "relu"; ``eps`` is added to the normaliser.
    Runs the Triton kernels on CUDA, the fp32 PyTorch reference elsewhere (see ``_dispatch``).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"linear_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"linear_attention: {name} must be 4-D (B, H, L, Dh), got shape "
                             f"{tuple(t.shape)}; split heads with .view(B, L, H, Dh).transpose(1, 2)")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"linear_attention: {name} has dtype {t.dtype}; "
                             f"use float32, bfloat16 or float16")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"linear_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); "
                         f"cast them to one dtype with .to(q.dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"linear_attention: q, k, v are on different devices ({q.device}, {k.device}, "
                         f"{v.device}); move them to one device")
    if k.shape != q.shape:
        raise ValueError(f"linear_attention: k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"linear_attention: v shape {tuple(v.shape)} must share (B, H, L) = "
                         f"{tuple(q.shape[:3])} with q")
    if q.numel() == 0 or v.numel() == 0:
        raise ValueError(f"linear_attention: q/v must be non-empty, got shapes {tuple(q.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"linear_attention: q/k head dim {q.shape[-1]} > {MAX_HEAD_DIM}; use more heads")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"linear_attention: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"linear_attention: eps must be a finite float >= 0, got {eps!r}")
    return linear_attn_op(q, k, v, feature_map, float(eps))
