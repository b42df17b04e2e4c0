"""2D neighbourhood attention over a raster-ordered (H, W) token grid, as Triton kernels.

Reads top to bottom: Triton kernels (forward, backward pre-pass, dk/dv, dq), the launchers
``nat2d_fwd``/``nat2d_bwd``, the custom ops ``graftfx::nat2d``/``graftfx::nat2d_bwd`` with
their autograd wiring, and the public ``neighborhood_attention_2d``.

A program owns BLOCK_M consecutive queries (raster order) of one (batch, head). Their k x k
windows cover a band of key rows and, when the block sits inside one image row, a narrow
range of columns; the program sweeps exactly those (row, column-chunk) key tiles with tensor
core dots, masks each query's own window, and keeps a flash-attention online softmax (fp32
running max/sum, natural-log logsumexp stored for the backward). The backward recomputes P:
dq sweeps like the forward; dk/dv programs own key blocks and sweep the inverse
neighbourhood (the queries whose window holds the key), so no atomics are needed.

Trip counts are compile-time (the largest sweep any block needs for this grid, kernel size
and block sizes, computed once on the host); each program starts at its own first row/column
and skips column chunks past its range. Compile-time bounds also keep the loops runnable
under ``TRITON_INTERPRET=1``, whose loops accept only compile-time bounds with numpy 2.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._attention import LOG2E as _LOG2E
from .._attention import align as _align, delta as _delta, dot as _dot, launch_cfg as _launch_cfg
from .._attention import strides as _strides, unit_last as _unit_last
from .._dispatch import interpreting, on_device, use_triton
from .naive import naive_nat2d, naive_nat2d_bwd



# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _win_start(pos, size, KS):
    """First row/column of the window of ``pos`` on an axis of ``size`` (shifted inward)."""
    return tl.maximum(tl.minimum(pos - KS // 2, size - KS), 0)


@triton.jit
def _inv_first(pos, KS):
    """First query row/column whose window holds key row/column ``pos``."""
    return tl.where(pos <= KS - 1, 0, pos - KS // 2)


@triton.jit
def _inv_last(pos, size, KS):
    """Last query row/column whose window holds key row/column ``pos``."""
    return tl.where(pos >= size - KS, size - 1, pos + KS // 2)


@triton.jit
def _nat2d_fwd_kernel(Q, K, V, O, LSE,
                      sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                      NH, GH, GW, KS, qk_scale,
                      HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      N_ROWS: tl.constexpr, N_COLS: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    sqb, sqh, sql = sqb * ALIGN, sqh * ALIGN, sql * ALIGN     # strides in units of ALIGN
    skb, skh, skl = skb * ALIGN, skh * ALIGN, skl * ALIGN     # (see _attention.align)
    svb, svh, svl = svb * ALIGN, svh * ALIGN, svl * ALIGN
    sob, soh, sol = sob * ALIGN, soh * ALIGN, sol * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)  # 64-bit base offsets: B*H*L*D may pass 2**31
    h = (pid_bh % NH).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    L = GH * GW
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM
    # Each query's window: rows si .. si + kr_n - 1, columns sj .. sj + kc_n - 1.
    si = _win_start(offs_m // GW, GH, KS)
    sj = _win_start(offs_m % GW, GW, KS)
    kr_n = tl.minimum(KS, GH)
    kc_n = tl.minimum(KS, GW)
    # The block's key band: rows from the first query's window start, columns from the first
    # to the last query's window when the block lies in one image row (else whole rows).
    last = tl.minimum(m0 + BLOCK_M, L) - 1
    one_row = (m0 // GW) == (last // GW)
    c_lo = tl.where(one_row, _win_start(m0 % GW, GW, KS), 0)
    c_hi = tl.where(one_row, _win_start(last % GW, GW, KS) + kc_n, GW)
    row_first = tl.minimum(_win_start(m0 // GW, GH, KS), tl.maximum(GH - N_ROWS, 0))

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite floor: see the SWA kernel
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for rr in range(N_ROWS):
        kr = row_first + rr
        row_hit = (kr >= si) & (kr < si + kr_n) & m_ok
        for cb in range(N_COLS):
            c0 = c_lo + cb * BLOCK_N
            if c0 < c_hi:
                kc = c0 + tl.arange(0, BLOCK_N)
                n_ok = kc < c_hi
                offs_n = kr * GW + kc
                kt = tl.load(k_base + offs_n[None, :] * skl + offs_d[:, None],
                             mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                s = _dot(q, kt, PRECISION, UPCAST) * qk_scale
                keep = (row_hit[:, None] & n_ok[None, :]
                        & (kc[None, :] >= sj[:, None]) & (kc[None, :] < sj[:, None] + kc_n))
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :],
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
                m_i = m_new

    # Every real query has at least itself in its window, so l_i == 0 only when every score is
    # -inf (an infinite input): NaN and -inf, as softmax gives (rows past L are not stored). A NaN
    # score is skipped by the running max but reaches l_i: the logsumexp is NaN too.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = tl.where(l_i[:, None] > 0.0, acc / l_safe[:, None], float("nan"))
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    lse = tl.where(l_i > 0.0, lse, float("-inf"))
    lse = tl.where(l_i == l_i, lse, float("nan"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * L + offs_m, lse, mask=m_ok)


@triton.jit
def _nat2d_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                           sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
                           NH, GH, GW, KS, sm_scale, qk_scale,
                           HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           N_ROWS: tl.constexpr, N_COLS: tl.constexpr,
                           PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # A program owns BLOCK_N keys and sweeps the queries whose window holds one of them.
    sqb, sqh, sql = sqb * ALIGN, sqh * ALIGN, sql * ALIGN     # strides in units of ALIGN
    skb, skh, skl = skb * ALIGN, skh * ALIGN, skl * ALIGN     # (see _attention.align)
    svb, svh, svl = svb * ALIGN, svh * ALIGN, svl * ALIGN
    sdb, sdh, sdl = sdb * ALIGN, sdh * ALIGN, sdl * ALIGN
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    L = GH * GW
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]
    ka = offs_n // GW
    kb = offs_n % GW
    kr_n = tl.minimum(KS, GH)
    kc_n = tl.minimum(KS, GW)
    last = tl.minimum(n0 + BLOCK_N, L) - 1
    one_row = (n0 // GW) == (last // GW)
    j_lo = tl.where(one_row, _inv_first(n0 % GW, KS), 0)
    j_hi = tl.where(one_row, _inv_last(last % GW, GW, KS) + 1, GW)
    row_first = tl.minimum(_inv_first(n0 // GW, KS), tl.maximum(GH - N_ROWS, 0))

    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh

    for rr in range(N_ROWS):
        qi = row_first + rr
        si = _win_start(qi, GH, KS)
        row_hit = (ka >= si) & (ka < si + kr_n) & n_ok
        for cb in range(N_COLS):
            c0 = j_lo + cb * BLOCK_M
            if c0 < j_hi:
                qj = c0 + tl.arange(0, BLOCK_M)
                q_ok = qj < j_hi
                offs_m = qi * GW + qj
                q_mask = q_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :],
                            mask=q_mask, other=0.0)
                do = tl.load(do_base + offs_m[:, None] * sdl + offs_d[None, :],
                             mask=q_mask, other=0.0)
                lse2 = tl.load(LSE + bh * L + offs_m, mask=q_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + bh * L + offs_m, mask=q_ok, other=0.0)
                sj = _win_start(qj, GW, KS)

                st = _dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
                keep = (row_hit[:, None] & q_ok[None, :]
                        & (kb[:, None] >= sj[None, :]) & (kb[:, None] < sj[None, :] + kc_n))
                pt = tl.where(keep, tl.exp2(st - lse2[None, :]), 0.0)
                dv += _dot(pt.to(do.dtype), do, PRECISION, UPCAST)
                dpt = _dot(v, tl.trans(do), PRECISION, UPCAST)
                dst = pt * (dpt - delta[None, :])
                dk += _dot(dst.to(q.dtype), q, PRECISION, UPCAST)

    dk = dk * sm_scale
    tl.store(DK + bh * L * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + bh * L * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _nat2d_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                         sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
                         NH, GH, GW, KS, sm_scale, qk_scale,
                         HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         N_ROWS: tl.constexpr, N_COLS: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # A program owns BLOCK_M queries and sweeps the key tiles of their windows, as the forward.
    sqb, sqh, sql = sqb * ALIGN, sqh * ALIGN, sql * ALIGN     # strides in units of ALIGN
    skb, skh, skl = skb * ALIGN, skh * ALIGN, skl * ALIGN     # (see _attention.align)
    svb, svh, svl = svb * ALIGN, svh * ALIGN, svl * ALIGN
    sdb, sdh, sdl = sdb * ALIGN, sdh * ALIGN, sdl * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    L = GH * GW
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM
    q_mask = m_ok[:, None] & d_ok[None, :]
    si = _win_start(offs_m // GW, GH, KS)
    sj = _win_start(offs_m % GW, GW, KS)
    kr_n = tl.minimum(KS, GH)
    kc_n = tl.minimum(KS, GW)
    last = tl.minimum(m0 + BLOCK_M, L) - 1
    one_row = (m0 // GW) == (last // GW)
    c_lo = tl.where(one_row, _win_start(m0 % GW, GW, KS), 0)
    c_hi = tl.where(one_row, _win_start(last % GW, GW, KS) + kc_n, GW)
    row_first = tl.minimum(_win_start(m0 // GW, GH, KS), tl.maximum(GH - N_ROWS, 0))

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    for rr in range(N_ROWS):
        kr = row_first + rr
        row_hit = (kr >= si) & (kr < si + kr_n) & m_ok
        for cb in range(N_COLS):
            c0 = c_lo + cb * BLOCK_N
            if c0 < c_hi:
                kc = c0 + tl.arange(0, BLOCK_N)
                n_ok = kc < c_hi
                offs_n = kr * GW + kc
                kv_mask = n_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + offs_n[:, None] * skl + offs_d[None, :],
                            mask=kv_mask, other=0.0)
                v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :],
                            mask=kv_mask, other=0.0)
                s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
                keep = (row_hit[:, None] & n_ok[None, :]
                        & (kc[None, :] >= sj[:, None]) & (kc[None, :] < sj[:, None] + kc_n))
                p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
                dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
                ds = p * (dp - delta[:, None])
                dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)

    dq = dq * sm_scale
    tl.store(DQ + bh * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------- launchers
def _win_start_host(pos: int, size: int, ks: int) -> int:
    return max(min(pos - ks // 2, size - ks), 0)


def _inv_first_host(pos: int, ks: int) -> int:
    return 0 if pos <= ks - 1 else pos - ks // 2


def _inv_last_host(pos: int, size: int, ks: int) -> int:
    return size - 1 if pos >= size - ks else pos + ks // 2


@functools.lru_cache(maxsize=256)
def _sweep(height: int, width: int, ks: int, outer: int, inner: int,
           inverse: bool) -> tuple[int, int]:
    """(rows, column chunks) the largest sweep of any outer block needs: the kernels' static
    trip counts. Mirrors the kernels' band arithmetic, block by block.

    inverse=False: query blocks sweeping their windows' keys (forward, dq);
    inverse=True: key blocks sweeping the queries whose windows hold them (dk, dv).
    """
    length = height * width
    n_rows = n_cols = 1
    for start in range(0, length, outer):
        last = min(start + outer, length) - 1
        r0, r1 = start // width, last // width
        if inverse:
            rows = _inv_last_host(r1, height, ks) - _inv_first_host(r0, ks) + 1
            cols = (_inv_last_host(last % width, width, ks) + 1
                    - _inv_first_host(start % width, ks)) if r0 == r1 else width
        else:
            rows = (_win_start_host(r1, height, ks) + min(ks, height)
                    - _win_start_host(r0, height, ks))
            cols = (_win_start_host(last % width, width, ks) + min(ks, width)
                    - _win_start_host(start % width, width, ks)) if r0 == r1 else width
        n_rows, n_cols = max(n_rows, rows), max(n_cols, triton.cdiv(cols, inner))
    return min(n_rows, height), n_cols


def _default_outer(width: int) -> int:
    """The owned block for a grid width: blocks that divide the width stay inside one image row
    and so sweep only their columns' neighbourhood. On grids narrower than 16 every block spans
    whole rows anyway: take the largest."""
    fallback = 64 if width < 16 else 32 if width >= 32 else 16
    return next((b for b in (64, 32, 16) if width % b == 0), fallback)


def _inner_block(kernel_size: int) -> int:
    """The swept block: a k <= 9 window spans at most 16 columns of a chunk-aligned band."""
    return 16 if kernel_size <= 9 else 32


def _blocks(width: int, kernel_size: int, block_m: int | None, block_n: int | None):
    """(outer, inner) block sizes given explicitly (either may be None: the default). The
    outer block is what a program owns, the inner block what it sweeps."""
    outer, inner = block_m or _default_outer(width), block_n or _inner_block(kernel_size)
    for name, val in (("block_m", outer), ("block_n", inner)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {val}")
    return outer, inner


# Autotuned launch configurations (owned block, warps, stages), one list per element size (fp32
# tiles feed FMA dots, not tensor cores, and take far more registers); the swept block follows
# the kernel size and the trip counts (N_ROWS, N_COLS) the block sizes and the grid. ``_fits``
# keeps the dtype's configs whose owned block divides the grid width (a block inside one image
# row sweeps only its columns' band; all of them when none divides) and whose owned tiles stay
# within 128 bytes per thread. Every config kept compiles without spills for sm_90 at head dims
# 64 and 72, bf16 and fp32 (benchmarks/kernel_static.py; tests/kernels/test_static.py checks
# bf16): the lists are that report's survivors. Under the interpreter there is one config, with
# ``_default_outer``'s owned block: CPU runs never benchmark.
def _fits(configs, named_args, **kwargs):
    elem, width, block_d = named_args["Q"].element_size(), named_args["GW"], kwargs["BLOCK_D"]
    mine = [c for c in configs if c.elem == min(elem, 4)] or configs
    rows = [c for c in mine if width % c.kwargs[c.owned] == 0] or mine
    keep = [c for c in rows if c.kwargs[c.owned] * block_d * elem <= 128 * 32 * c.num_warps]
    return keep or [min(rows, key=lambda c: (c.kwargs[c.owned], -c.num_warps))]


def _tuned(kernel, outer: str, inner: str, inverse: bool, configs: dict):
    """``kernel`` autotuned over ``configs`` ({element size: [(owned block ``outer``, warps,
    stages)]}), keyed on the grid, the kernel size, the head dim and the dtypes; the swept block
    ``inner`` and the trip counts are derived (``inverse``: key blocks sweeping the queries
    whose windows hold them)."""
    heurs = {}
    if interpreting():
        heurs[outer] = lambda a: _default_outer(a["GW"])
        cfgs = [triton.Config({}, num_warps=4, num_stages=2)]
    else:
        cfgs = []
        for elem, rows in configs.items():
            for block, warps, stages in rows:
                c = triton.Config({outer: block}, num_warps=warps, num_stages=stages)
                c.owned, c.elem = outer, elem
                cfgs.append(c)
    heurs[inner] = lambda a: _inner_block(a["KS"])
    heurs["N_ROWS"] = lambda a: _sweep(a["GH"], a["GW"], a["KS"], a[outer], a[inner], inverse)[0]
    heurs["N_COLS"] = lambda a: _sweep(a["GH"], a["GW"], a["KS"], a[outer], a[inner], inverse)[1]
    return triton.autotune(cfgs, key=["GH", "GW", "KS", "HEAD_DIM"],
                           prune_configs_by={"early_config_prune": _fits})(triton.heuristics(heurs)(kernel))


# {element size: [(owned block, warps, stages)]}: 2 for bf16/fp16, 4 for fp32
_FWD_CONFIGS = {2: [(64, 4, 2), (64, 8, 2), (32, 4, 2)], 4: [(64, 8, 2), (32, 4, 2), (16, 4, 2)]}
_DKDV_CONFIGS = {2: [(64, 8, 2), (64, 4, 2), (32, 4, 2), (16, 4, 2)], 4: [(64, 8, 2), (32, 8, 2), (16, 4, 2)]}
_DQ_CONFIGS = {2: [(64, 8, 2), (64, 4, 2), (32, 4, 2), (16, 4, 2)], 4: [(64, 4, 2), (32, 4, 2), (32, 8, 2)]}
_nat2d_fwd_tuned = _tuned(_nat2d_fwd_kernel, "BLOCK_M", "BLOCK_N", False, _FWD_CONFIGS)
_nat2d_bwd_dkdv_tuned = _tuned(_nat2d_bwd_dkdv_kernel, "BLOCK_N", "BLOCK_M", True, _DKDV_CONFIGS)
_nat2d_bwd_dq_tuned = _tuned(_nat2d_bwd_dq_kernel, "BLOCK_M", "BLOCK_N", False, _DQ_CONFIGS)


def _launch(tuned, kernel, owned: str, inverse: bool, grid, kernel_size: int, explicit, args,
            meta, programs: int):
    """Launch ``tuned`` (autotuned), or ``kernel`` with the explicit (owned, swept) blocks."""
    L = grid[0] * grid[1]
    if explicit is None:
        tuned[lambda m: (triton.cdiv(L, m[owned]), programs)](*args, **meta)
        return
    outer, inner = explicit
    rows, cols = _sweep(grid[0], grid[1], kernel_size, outer, inner, inverse)
    swept = "BLOCK_N" if owned == "BLOCK_M" else "BLOCK_M"
    kernel[(triton.cdiv(L, outer), programs)](
        *args, **meta, **{owned: outer, swept: inner}, N_ROWS=rows, N_COLS=cols,
        num_warps=8 if meta["BLOCK_D"] >= 128 else 4, num_stages=2)


def nat2d_fwd(q, k, v, grid: tuple[int, int], kernel_size: int, scale: float | None = None,
              block_m: int | None = None, block_n: int | None = None):
    """q, k, v: (B, heads, H*W, Dh) -> (o in q.dtype, lse (B, heads, L) fp32, natural log).

    Block sizes are autotuned unless ``block_m`` (queries a program owns) or ``block_n`` (keys
    it sweeps per step) is given."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, NH, L, D = q.shape
    gh, gw = grid
    scale = D ** -0.5 if scale is None else float(scale)
    explicit = _blocks(gw, kernel_size, block_m, block_n) if block_m or block_n else None
    block_d, precision, upcast = _launch_cfg(q.dtype, D)
    o = torch.empty((B, NH, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, NH, L), dtype=torch.float32, device=q.device)
    a = _align(q, k, v, o)
    args = (q, k, v, o, lse, *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(o, a),
            NH, gh, gw, kernel_size, scale * _LOG2E)
    meta = dict(HEAD_DIM=D, ALIGN=a, BLOCK_D=block_d, PRECISION=precision, UPCAST=upcast)
    with on_device(q):
        _launch(_nat2d_fwd_tuned, _nat2d_fwd_kernel, "BLOCK_M", False, grid, kernel_size,
                explicit, args, meta, B * NH)
    return o, lse


def nat2d_bwd(do, q, k, v, o, lse, grid: tuple[int, int], kernel_size: int,
              scale: float | None = None, dlse=None,
              block_m: int | None = None, block_n: int | None = None):
    """Gradients (dq, dk, dv) in q.dtype of ``nat2d_fwd``'s outputs; ``dlse`` optional.

    Block sizes are autotuned unless given: ``block_m`` is the block a program owns (queries
    for dq, keys for dk/dv), ``block_n`` the block it sweeps per step."""
    q, k, v, o, do = (_unit_last(t) for t in (q, k, v, o, do))
    B, NH, L, D = q.shape
    gh, gw = grid
    scale = D ** -0.5 if scale is None else float(scale)
    explicit = _blocks(gw, kernel_size, block_m, block_n) if block_m or block_n else None
    block_d, precision, upcast = _launch_cfg(q.dtype, D)
    lse = lse.float().contiguous()
    dq = torch.empty((B, NH, L, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    a = _align(q, k, v, do)
    common = (*_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(do, a),
              NH, gh, gw, kernel_size, scale, scale * _LOG2E)
    meta = dict(HEAD_DIM=D, ALIGN=a, BLOCK_D=block_d, PRECISION=precision, UPCAST=upcast)
    with on_device(q):
        delta = _delta(o, do, dlse)
        # dk/dv: programs own key blocks (BLOCK_N) and sweep query chunks (BLOCK_M).
        _launch(_nat2d_bwd_dkdv_tuned, _nat2d_bwd_dkdv_kernel, "BLOCK_N", True, grid,
                kernel_size, explicit, (q, k, v, do, lse, delta, dk, dv, *common), meta, B * NH)
        _launch(_nat2d_bwd_dq_tuned, _nat2d_bwd_dq_kernel, "BLOCK_M", False, grid,
                kernel_size, explicit, (q, k, v, do, lse, delta, dq, *common), meta, B * NH)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("graftfx::nat2d", mutates_args=())
def nat2d_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int,
             kernel_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of 2D neighbourhood attention; Triton or the fp32 reference (see _dispatch)."""
    if use_triton(q):
        return nat2d_fwd(q, k, v, (height, width), kernel_size, scale)
    o, lse = naive_nat2d(q, k, v, (height, width), kernel_size, scale)
    return o.to(q.dtype).contiguous(), lse.contiguous()


@nat2d_op.register_fake
def _nat2d_fake(q, k, v, height, width, kernel_size, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("graftfx::nat2d_bwd", mutates_args=())
def nat2d_bwd_op(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 height: int, width: int, kernel_size: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return nat2d_bwd(do, q, k, v, o, lse, (height, width), kernel_size, scale, dlse=dlse)
    grads = naive_nat2d_bwd(do, dlse, q, k, v, (height, width), kernel_size, scale)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))


@nat2d_bwd_op.register_fake
def _nat2d_bwd_fake(do, dlse, q, k, v, o, lse, height, width, kernel_size, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _nat2d_setup(ctx, inputs, output):
    q, k, v, height, width, kernel_size, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.args = (height, width, kernel_size, scale)


def _nat2d_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = nat2d_bwd_op(do, dlse, q, k, v, o, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None


nat2d_op.register_autograd(_nat2d_backward, setup_context=_nat2d_setup)


# ----------------------------------------------------------------------------- public function
def neighborhood_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              grid: tuple[int, int], kernel_size: int = 7,
                              scale: float | None = None, return_lse: bool = False):
    """2D neighbourhood attention: each token of the (H, W) grid (raster order) attends to
    the kernel_size x kernel_size window around it, shifted inward at the borders.

    q, k, v: (B, heads, H*W, head_dim), fp32/bf16/fp16, same shape, dtype and device.
    Returns o with q's shape and dtype (and the fp32 logsumexp (B, heads, L) when
    ``return_lse``). Runs the graftfx::nat2d custom op: Triton on GPU, fp32 reference on CPU.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, H*W, head_dim), "
                             f"got {getattr(t, 'shape', type(t))}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k and v must have q's shape {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim must be <= 256, got {q.shape[-1]}; use more heads")
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    height, width = int(grid[0]), int(grid[1])
    if height * width != q.shape[-2]:
        raise ValueError(f"grid {height}x{width} has {height * width} tokens but q has "
                         f"{q.shape[-2]}; pass the token grid (H, W) with H*W == L")
    if (isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1
            or kernel_size % 2 == 0):
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, lse = nat2d_op(q, k, v, height, width, kernel_size, scale)
    return (o, lse) if return_lse else o


__all__ = ["nat2d_bwd", "nat2d_bwd_op", "nat2d_fwd", "nat2d_op", "neighborhood_attention_2d"]
