"""Fused Hyena-X gate: causal short conv over q, k, v, then ``y = q * (k * v)``, in one pass.

Two layouts share the kernels:

- ``hyena_x_gate`` (attention replacement): ``u`` (B, L, 3d) is the in-projection output; the
  conv runs along tokens with one (K,) filter per channel of all 3d channels (weight (3d, K));
  q, k, v are the channel thirds of the conv output; ``y`` is (B, L, d).
- ``mlp_hyena_x_gate`` (MLP replacement): ``u`` (B, L, 3M); the conv runs along the FEATURE axis
  with one filter per token (weight (L, K)) over the whole concatenated 3M features ("chained":
  the first taps of k's features read q's last features); q, k, v are the feature thirds.

In kernel terms both are a conv along an axis of length N per group (L, or M) over C channels
(d, or L), with three groups q, k, v at a fixed element offset; chained groups continue one
sequence of length 3N. No conv output ever reaches HBM: the forward reads u (plus a K-1 halo
through L1/L2) and writes y. The backward recomputes q, k, v on the K row shifts it needs,
``du_g[s] = sum_m w_g[K-1-m] * dc_g[s+m]`` with ``dc_q = dy*k*v``, ``dc_k = dy*q*v``,
``dc_v = dy*q*k``. A backward program walks a run of row tiles (``common.row_splits``: a few
runs per channel block) and sums dweight/dbias over them in registers; the launcher adds the
runs' fp32 partials (deterministic). In chained mode ``dc`` past the end of a group belongs to
the next group.

Reads top to bottom: Triton kernels, launchers (``hyena_x_fwd``/``hyena_x_bwd``,
``mlp_hyena_x_fwd``/``mlp_hyena_x_bwd``), custom ops with autograd, public functions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import interpreting, on_device, use_triton
from . import naive
from .common import (cast_grads, check_activation, check_bias, check_filter, conv_tile,
                     fit_tiles, row_splits, taps_major)

# (BLOCK_N, BLOCK_C, num_warps), sized from ptxas (sm_90a) register reports: no spills for
# bf16/fp16/fp32, K = 3 and 4, with and without 16-divisible extents. The backward holds the
# 3*K conv weights of its channels, three du accumulators and one shift's q, k, v, dy; its tiles
# are per element size (2: bf16/fp16, 4: fp32) so that a thread holds 16 contiguous bytes of
# every tile it loads (128-bit loads of u and dy): bf16 (32, 64) at 8 warps takes ~255
# registers at K = 4 (the (32, 32) tile took 128 with 64-bit loads), fp32 (16, 32) at 4 warps
# ~165 (capped, _BWD_MAXNREG), since each program also carries its weight-gradient sums over a
# run of row tiles. Most of it is the 3*K conv weights, loop-invariant over the shifts and so
# held for the whole loop: 8 channels a thread at K = 4 are 96 fp32 registers.
# Filters are read taps-major (common.taps_major): one vector load per tap.
_FWD_TILES, _BWD_TILES = (32, 64, 8), {2: (32, 64, 8), 4: (16, 32, 4)}
_FWD_TILES_CHAINED, _BWD_TILES_CHAINED = (128, 16, 8), (64, 16, 8)
# (chained, element size) -> register cap of the backward launch, K <= 4. fp32 (16, 32) at 4
# warps takes 209 registers uncapped at K = 4 (2 programs an SM); capped at 168 ptxas fits it in
# 164 without spilling (3 an SM; at 128 it spills 8 B; K = 8 at 168 spills ~100 B: no cap).
_BWD_MAXNREG = {(False, 4): {"maxnreg": 168}}


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _hyena_x_fwd_kernel(U, W, BIAS, Y, N, C,
                        stride_ub, stride_un, stride_uc, group_off, stride_wg, stride_bg, stride_wk,
                        stride_yb, stride_yn, stride_yc,
                        K: tl.constexpr, CHAINED: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    mask_c = offs_c < C
    u_b = U + pid_b * stride_ub
    q = conv_tile(u_b, W, BIAS, rows, offs_c, row_ok, mask_c, 0,
                  stride_un, stride_uc, stride_wk, K, HAS_BIAS, BLOCK_N, BLOCK_C)
    k = conv_tile(u_b + group_off, W + stride_wg, BIAS + stride_bg, rows, offs_c, row_ok, mask_c,
                  -N * CHAINED, stride_un, stride_uc, stride_wk, K, HAS_BIAS, BLOCK_N, BLOCK_C)
    v = conv_tile(u_b + 2 * group_off, W + 2 * stride_wg, BIAS + 2 * stride_bg, rows, offs_c,
                  row_ok, mask_c, -2 * N * CHAINED, stride_un, stride_uc, stride_wk, K, HAS_BIAS,
                  BLOCK_N, BLOCK_C)
    y = q * (k * v)
    tl.store(Y + pid_b * stride_yb + rows[:, None] * stride_yn + offs_c[None, :] * stride_yc,
             y.to(Y.dtype.element_ty), mask=row_ok[:, None] & mask_c[None, :])


@triton.jit
def _dconv_at(u_b, W, BIAS, dy_b, rows, m, offs_c, row_ok, mask_c, N, lo_k, lo_v, group_off,
              stride_wg, stride_bg, stride_wk, stride_un, stride_uc, stride_dyn, stride_dyc,
              K: tl.constexpr, CHAINED: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Conv-output gradients (dc_q, dc_k, dc_v) at rows + m, recomputing q, k, v there, and the
    rows that fell past the end of their group (chained: they are the next group's first rows)."""
    r = rows + m
    if CHAINED:
        wrap = r >= N
        r = tl.where(wrap, r - N, r)
        ok = row_ok
    else:
        wrap = r < 0                  # never: unchained rows past N are masked to zero instead
        ok = r < N
    cq = conv_tile(u_b, W, BIAS, r, offs_c, ok, mask_c, 0,
                   stride_un, stride_uc, stride_wk, K, HAS_BIAS, BLOCK_N, BLOCK_C)
    ck = conv_tile(u_b + group_off, W + stride_wg, BIAS + stride_bg, r, offs_c, ok, mask_c,
                   lo_k, stride_un, stride_uc, stride_wk, K, HAS_BIAS, BLOCK_N, BLOCK_C)
    cv = conv_tile(u_b + 2 * group_off, W + 2 * stride_wg, BIAS + 2 * stride_bg, r, offs_c,
                   ok, mask_c, lo_v, stride_un, stride_uc, stride_wk, K, HAS_BIAS, BLOCK_N, BLOCK_C)
    dy = tl.load(dy_b + r[:, None] * stride_dyn + offs_c[None, :] * stride_dyc,
                 mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    return dy * (ck * cv), dy * (cq * cv), dy * (cq * ck), wrap


@triton.jit
def _dw_tap(acc, slot, j, dq, dk, dv, u_b, rows, row_ok, offs_c, mask_c, lo_k, lo_v, group_off,
            stride_un, stride_uc, K: tl.constexpr):
    """acc (SLOTS, BLOCK_C) + one tap's weight-gradient sums over a tile: row g * (K + 1) + j
    gets sum_t dc_g[t] * u_g[t - (K-1) + j] for group g; j = K is the bias (u = 1)."""
    src = rows - (K - 1) + j
    tap = row_ok & (j < K)
    u_ptrs = u_b + src[:, None] * stride_un + offs_c[None, :] * stride_uc
    xq = tl.load(u_ptrs, mask=(tap & (src >= 0))[:, None] & mask_c[None, :],
                 other=0.0).to(tl.float32)
    xk = tl.load(u_ptrs + group_off, mask=(tap & (src >= lo_k))[:, None] & mask_c[None, :],
                 other=0.0).to(tl.float32)
    xv = tl.load(u_ptrs + 2 * group_off, mask=(tap & (src >= lo_v))[:, None] & mask_c[None, :],
                 other=0.0).to(tl.float32)
    if j == K:
        xq, xk, xv = xq + 1.0, xk + 1.0, xv + 1.0              # all masked to 0 above
    acc += tl.where(slot == j, tl.sum(dq * xq, axis=0)[None, :], 0.0)
    acc += tl.where(slot == K + 1 + j, tl.sum(dk * xk, axis=0)[None, :], 0.0)
    acc += tl.where(slot == 2 * (K + 1) + j, tl.sum(dv * xv, axis=0)[None, :], 0.0)
    return acc


@triton.jit
def _hyena_x_bwd_kernel(U, W, BIAS, DY, DU, DW_PART, N, C, TILES_PER,
                        stride_ub, stride_un, stride_uc, group_off, stride_wg, stride_bg, stride_wk,
                        stride_dyb, stride_dyn, stride_dyc,
                        K: tl.constexpr, CHAINED: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SLOTS: tl.constexpr):
    # A program walks TILES_PER consecutive row tiles of one channel block and sums its share
    # of dw_g[c, j] = sum_t dc_g[t] * u_g[t - (K-1) + j] and db_g[c] = sum_t dc_g[t] in
    # registers, stacked in one (SLOTS, BLOCK_C) fp32 tile: row g * (K + 1) + j is group g's
    # tap j, row g * (K + 1) + K its bias. The stacked rows spread over the threads (a thread
    # holds one row of it); 3 * (K + 1) separate (BLOCK_C,) sums would each sit whole in every
    # thread's registers and spill. One store at the end: the launcher sums the programs'
    # partials (deterministic, no atomics).
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    u_b = U + pid_b * stride_ub
    dy_b = DY + pid_b * stride_dyb
    lo_k = -N * CHAINED
    lo_v = -2 * N * CHAINED
    slot = tl.arange(0, SLOTS)[:, None]                       # (SLOTS, 1)
    acc = tl.zeros((SLOTS, BLOCK_C), dtype=tl.float32)

    tile = pid_s * TILES_PER
    end = tl.minimum(tile + TILES_PER, tl.cdiv(N, BLOCK_N))
    # `while`, not `for tile in range(...)`: the interpreter cannot index a runtime loop bound
    while tile < end:
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        # Conv outputs at row s + m reach u[s] through tap K-1-m. A runtime loop: unrolled, the
        # compiler would hoist all 3*K*K shifted loads at once and spill.
        du_q = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        du_k = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        du_v = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for m in tl.range(0, K, loop_unroll_factor=1):
            dq, dk, dv, wrap = _dconv_at(u_b, W, BIAS, dy_b, rows, m, offs_c, row_ok, mask_c, N,
                                         lo_k, lo_v, group_off, stride_wg, stride_bg, stride_wk,
                                         stride_un, stride_uc, stride_dyn, stride_dyc, K,
                                         CHAINED, HAS_BIAS, BLOCK_N, BLOCK_C)
            w_ptrs = W + (K - 1 - m) * stride_wk + offs_c
            wq = tl.load(w_ptrs, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            wk = tl.load(w_ptrs + stride_wg, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            wv = tl.load(w_ptrs + 2 * stride_wg, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            if CHAINED:
                du_q += wq * tl.where(wrap[:, None], dk, dq)
                du_k += wk * tl.where(wrap[:, None], dv, dk)
                du_v += wv * tl.where(wrap[:, None], 0.0, dv)
            else:
                du_q += wq * dq
                du_k += wk * dk
                du_v += wv * dv
            if m == 0:
                # the tile's own rows t: its share of dw_g[j] = sum_t dc_g[t] u_g[t - (K-1) + j]
                # and, as "tap" K with u = 1, of db_g = sum_t dc_g[t]. Channels contiguous: a
                # runtime loop over the taps (unrolled, with no store in between, all 3*K loads
                # were hoisted at once and spilled); rows contiguous (chained): unrolled, as a
                # runtime tap offset would hide the rows' alignment and narrow the loads.
                if CHAINED:
                    for j in tl.static_range(K + 1):
                        acc = _dw_tap(acc, slot, j, dq, dk, dv, u_b, rows, row_ok, offs_c, mask_c,
                                      lo_k, lo_v, group_off, stride_un, stride_uc, K)
                else:
                    for j in tl.range(0, K + 1, loop_unroll_factor=1):
                        acc = _dw_tap(acc, slot, j, dq, dk, dv, u_b, rows, row_ok, offs_c, mask_c,
                                      lo_k, lo_v, group_off, stride_un, stride_uc, K)

        mask = row_ok[:, None] & mask_c[None, :]
        du_ptrs = DU + pid_b * stride_ub + rows[:, None] * stride_un + offs_c[None, :] * stride_uc
        tl.store(du_ptrs, du_q.to(DU.dtype.element_ty), mask=mask)
        tl.store(du_ptrs + group_off, du_k.to(DU.dtype.element_ty), mask=mask)
        tl.store(du_ptrs + 2 * group_off, du_v.to(DU.dtype.element_ty), mask=mask)
        tile += 1

    # this program's partials: DW_PART (batch * splits, 3, K + 1, C), a row per slot (an empty
    # program, past the last tile, stores zeros)
    part = pid_b * tl.num_programs(0) + pid_s
    tl.store(DW_PART + (part * 3 * (K + 1) + slot) * C + offs_c[None, :], acc,
             mask=(slot < 3 * (K + 1)) & mask_c[None, :])


# ----------------------------------------------------------------------------- launchers
def _layout(u: torch.Tensor, chained: bool):
    """(N, C, stride_un, stride_uc, group_off) of contiguous u (B, L, 3*width) in kernel terms."""
    _, length, width3 = u.shape
    if chained:                                   # conv along features, channels = tokens
        return width3 // 3, length, 1, width3, width3 // 3
    return length, width3 // 3, width3, 1, width3 // 3   # conv along tokens, channels = d


def _fwd(u, weight, bias, chained):
    u, weight = u.contiguous(), weight.contiguous()
    batch, length, width3 = u.shape
    y = torch.empty((batch, length, width3 // 3), device=u.device, dtype=u.dtype)
    if y.numel() == 0:
        return y
    n, c, s_n, s_c, goff = _layout(u, chained)
    bn, bc, warps = fit_tiles(_FWD_TILES_CHAINED if chained else _FWD_TILES, n, c,
                              weight.shape[1], rows_contiguous=chained, interpreted=interpreting())
    # filters read taps-major (K, channels): group g's filters start at column g*c
    w_g, b_g = (0, 0) if chained else (c, c)
    with on_device(u):
        _hyena_x_fwd_kernel[(triton.cdiv(n, bn), triton.cdiv(c, bc), batch)](
            u, taps_major(weight), weight if bias is None else bias.contiguous(), y, n, c,
            u.stride(0), s_n, s_c, goff, w_g, b_g, weight.shape[0],
            y.stride(0), *((1, y.stride(1)) if chained else (y.stride(1), 1)),
            K=weight.shape[1], CHAINED=int(chained), HAS_BIAS=bias is not None,
            BLOCK_N=bn, BLOCK_C=bc, num_warps=warps)
    return y


def _bwd(dy, u, weight, bias, chained):
    u, weight, dy = u.contiguous(), weight.contiguous(), dy.contiguous()
    batch = u.shape[0]
    taps = weight.shape[1]
    du = torch.empty_like(u)
    db_dtype = weight.dtype if bias is None else bias.dtype
    if du.numel() == 0:
        return (du.zero_(), torch.zeros_like(weight),
                weight.new_zeros(weight.shape[0], dtype=db_dtype))
    n, c, s_n, s_c, goff = _layout(u, chained)
    bn, bc, warps = fit_tiles(_BWD_TILES_CHAINED if chained else _BWD_TILES[min(u.element_size(), 4)],
                              n, c, taps,
                              rows_contiguous=chained, interpreted=interpreting())
    n_tiles = triton.cdiv(n, bn)
    splits = row_splits(n_tiles, triton.cdiv(c, bc) * batch, u.device)
    tiles_per = triton.cdiv(n_tiles, splits)
    # per program: dweight taps 0..K-1 and dbias (row K) of each group, summed over its rows
    part = torch.empty((batch * splits, 3, taps + 1, c), device=u.device, dtype=torch.float32)
    w_g, b_g = (0, 0) if chained else (c, c)          # taps-major filters, as in _fwd
    with on_device(u):
        _hyena_x_bwd_kernel[(splits, triton.cdiv(c, bc), batch)](
            u, taps_major(weight), weight if bias is None else bias.contiguous(), dy, du, part,
            n, c, tiles_per, u.stride(0), s_n, s_c, goff, w_g, b_g, weight.shape[0],
            dy.stride(0), *((1, dy.stride(1)) if chained else (dy.stride(1), 1)),
            K=taps, CHAINED=int(chained), HAS_BIAS=bias is not None,
            BLOCK_N=bn, BLOCK_C=bc, SLOTS=triton.next_power_of_2(3 * (taps + 1)),
            num_warps=warps, **(_BWD_MAXNREG.get((chained, min(u.element_size(), 4)), {})
                                if taps <= 4 else {}))
    dw, db = part[:, :, :taps].sum(0), part[:, :, taps].sum(0)   # (3, K, C), (3, C): fresh
    if chained:                                          # one filter per token, shared by q, k, v
        dw, db = dw.sum(0).t(), db.sum(0)
    else:                                                # filters of channels g*d + c
        dw, db = dw.transpose(1, 2).reshape(3 * c, taps), db.reshape(3 * c)
    return du, dw.to(weight.dtype).contiguous(), db.to(db_dtype)


def hyena_x_fwd(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """u (B, L, 3d), weight (3d, K), bias (3d,) or None -> y (B, L, d) in u's dtype."""
    return _fwd(u, weight, bias, chained=False)


def hyena_x_bwd(dy, u, weight, bias):
    """-> (du (B, L, 3d), dweight (3d, K), dbias (3d,)); dbias even when bias is None."""
    return _bwd(dy, u, weight, bias, chained=False)


def mlp_hyena_x_fwd(u: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """u (B, L, 3M), weight (L, K), bias (L,) or None -> y (B, L, M) in u's dtype."""
    return _fwd(u, weight, bias, chained=True)


def mlp_hyena_x_bwd(dy, u, weight, bias):
    """-> (du (B, L, 3M), dweight (L, K), dbias (L,)); dbias even when bias is None."""
    return _bwd(dy, u, weight, bias, chained=True)


# ----------------------------------------------------------------------------- custom ops
def _bwd_fake(dy, u, weight, bias):
    db_dtype = weight.dtype if bias is None else bias.dtype
    return (u.new_empty(u.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],), dtype=db_dtype))


def _setup(ctx, inputs, output):
    u, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(u, weight, bias)


@torch.library.custom_op("graftfx::hyena_x_gate", mutates_args=())
def hyena_x_gate_op(u: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """Fused Hyena-X gate (B, L, 3d) -> (B, L, d); Triton or the fp32 reference (see _dispatch)."""
    if use_triton(u):
        return hyena_x_fwd(u, weight, bias)
    return naive.hyena_x(u, weight, bias).to(u.dtype).contiguous()


@hyena_x_gate_op.register_fake
def _hyena_x_fake(u, weight, bias):
    return u.new_empty((u.shape[0], u.shape[1], u.shape[2] // 3))


@torch.library.custom_op("graftfx::hyena_x_gate_bwd", mutates_args=())
def hyena_x_gate_bwd_op(
        dy: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dweight, dbias) of ``hyena_x_gate``."""
    if use_triton(u):
        return hyena_x_bwd(dy, u, weight, bias)
    return cast_grads(naive.hyena_x_bwd(dy, u, weight, bias), u, weight, bias)


hyena_x_gate_bwd_op.register_fake(_bwd_fake)


def _hyena_x_backward(ctx, dy):
    u, weight, bias = ctx.saved_tensors
    du, dw, db = torch.ops.graftfx.hyena_x_gate_bwd(dy, u, weight, bias)
    return du, dw, (db if ctx.has_bias else None)


hyena_x_gate_op.register_autograd(_hyena_x_backward, setup_context=_setup)


@torch.library.custom_op("graftfx::mlp_hyena_x_gate", mutates_args=())
def mlp_hyena_x_gate_op(u: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """Fused MLP Hyena-X gate (B, L, 3M) -> (B, L, M); Triton or the fp32 reference."""
    if use_triton(u):
        return mlp_hyena_x_fwd(u, weight, bias)
    return naive.mlp_hyena_x(u, weight, bias).to(u.dtype).contiguous()


@mlp_hyena_x_gate_op.register_fake
def _mlp_hyena_x_fake(u, weight, bias):
    return u.new_empty((u.shape[0], u.shape[1], u.shape[2] // 3))


@torch.library.custom_op("graftfx::mlp_hyena_x_gate_bwd", mutates_args=())
def mlp_hyena_x_gate_bwd_op(
        dy: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dweight, dbias) of ``mlp_hyena_x_gate``."""
    if use_triton(u):
        return mlp_hyena_x_bwd(dy, u, weight, bias)
    return cast_grads(naive.mlp_hyena_x_bwd(dy, u, weight, bias), u, weight, bias)


mlp_hyena_x_gate_bwd_op.register_fake(_bwd_fake)


def _mlp_hyena_x_backward(ctx, dy):
    u, weight, bias = ctx.saved_tensors
    du, dw, db = torch.ops.graftfx.mlp_hyena_x_gate_bwd(dy, u, weight, bias)
    return du, dw, (db if ctx.has_bias else None)


mlp_hyena_x_gate_op.register_autograd(_mlp_hyena_x_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public functions
def hyena_x_gate(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Hyena-X: ``q, k, v = causal_conv(u).chunk(3, -1)``; returns ``q * (k * v)``.

    u (B, L, 3d) in-projection output; weight (3d, K) depthwise filters (Conv1d tap order, the
    last tap is the current token); bias (3d,) or None. Returns (B, L, d) in u's dtype.
    """
    check_activation("u", u, groups=3)
    check_filter("weight", weight, u.shape[-1], u, "one filter per channel of u")
    check_bias("bias", bias, u.shape[-1], u)
    return torch.ops.graftfx.hyena_x_gate(u, weight, bias)


def mlp_hyena_x_gate(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """MLP Hyena-X: causal conv along the features of each token (weight (L, K), bias (L,)) over
    the concatenated 3M features of u (B, L, 3M), split into q, k, v; returns q * (k * v)."""
    check_activation("u", u, groups=3)
    taps = check_filter("weight", weight, u.shape[1], u, "one filter per token")
    check_bias("bias", bias, u.shape[1], u)
    if u.shape[-1] // 3 < taps:
        raise ValueError(f"u has {u.shape[-1] // 3} features per q/k/v group, fewer than the "
                         f"{taps} filter taps; use a shorter filter or a wider projection")
    return torch.ops.graftfx.mlp_hyena_x_gate(u, weight, bias)
