"""Fused Hyena-Y gate: ``y = q * h(k * v)`` with h a causal depthwise short conv over d channels.

``u`` (B, L, 3d) holds q, k, v side by side (the in-projection output, or the featurizer
output for Hyena-SE); weight (d, K), bias (d,). With ``z = k * v`` and ``g = h(z)``:

    y[t]   = q[t] * (bias + sum_j w[j] * z[t - (K-1) + j])
    dq[t]  = dy[t] * g[t]
    dz[p]  = sum_m w[K-1-m] * (dy * q)[p + m];   dk = dz * v,  dv = dz * k
    dw[j]  = sum_t (dy * q)[t] * z[t - (K-1) + j],  dbias = sum_t (dy * q)[t]

Neither z nor g reaches HBM: each (BLOCK_N tokens x BLOCK_C channels) tile re-reads the
K-1 halo rows of k, v (forward) and of q, dy (backward) through L1/L2. A backward program walks
a run of row tiles (``common.row_splits``: a few runs per channel block) and sums dweight/dbias
over them in registers; the launcher adds the runs' fp32 partials (deterministic).

Reads top to bottom: Triton kernels, launchers ``hyena_y_fwd``/``hyena_y_bwd``, the custom ops
``graftfx::hyena_y_gate``/``graftfx::hyena_y_gate_bwd`` with autograd, the public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import interpreting, on_device, use_triton
from . import naive
from .common import (cast_grads, check_activation, check_bias, check_filter, fit_tiles,
                     row_splits, taps_major)
from .featurize import short_conv

# (BLOCK_N, BLOCK_C, num_warps) on sm_90: about 105 registers, no spills (see common.fit_tiles).
_FWD_TILES, _BWD_TILES = (32, 128, 8), (32, 64, 8)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _hyena_y_fwd_kernel(U, W, BIAS, Y, L, D, stride_ub, stride_ul, stride_yb, stride_yl, stride_wk,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < L
    mask_c = offs_c < D
    u_b = U + pid_b * stride_ub

    g = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        src = rows - (K - 1) + j
        ptrs = u_b + src[:, None] * stride_ul + offs_c[None, :]
        msk = (row_ok & (src >= 0))[:, None] & mask_c[None, :]
        k = tl.load(ptrs + D, mask=msk, other=0.0).to(tl.float32)
        v = tl.load(ptrs + 2 * D, mask=msk, other=0.0).to(tl.float32)
        w = tl.load(W + j * stride_wk + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        g += tl.where(msk, w[None, :] * (k * v), 0.0)     # rows before the start add no term
    if HAS_BIAS:
        g += tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & mask_c[None, :]
    q = tl.load(u_b + rows[:, None] * stride_ul + offs_c[None, :], mask=mask, other=0.0)
    tl.store(Y + pid_b * stride_yb + rows[:, None] * stride_yl + offs_c[None, :],
             (q.to(tl.float32) * g).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _hyena_y_bwd_kernel(U, W, BIAS, DY, DU, DW_PART, L, D, TILES_PER,
                        stride_ub, stride_ul, stride_dyb, stride_dyl, stride_wk,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SLOTS: tl.constexpr):
    # A program walks TILES_PER consecutive row tiles of one channel block, summing its share of
    # dw[j] = sum_t dg[t] * z[t-(K-1)+j] (row j) and dbias = sum_t dg[t] (row K) in one stacked
    # (SLOTS, BLOCK_C) fp32 tile (its rows spread over the threads), stored once at the end.
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < D
    u_b = U + pid_b * stride_ub
    dy_b = DY + pid_b * stride_dyb
    slot = tl.arange(0, SLOTS)[:, None]                       # (SLOTS, 1): tap j, then the bias
    acc = tl.zeros((SLOTS, BLOCK_C), dtype=tl.float32)

    tile = pid_s * TILES_PER
    end = tl.minimum(tile + TILES_PER, tl.cdiv(L, BLOCK_N))
    # `while`, not `for tile in range(...)`: the interpreter cannot index a runtime loop bound
    while tile < end:
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < L
        mask = row_ok[:, None] & mask_c[None, :]
        q0 = tl.load(u_b + rows[:, None] * stride_ul + offs_c[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        dy0 = tl.load(dy_b + rows[:, None] * stride_dyl + offs_c[None, :], mask=mask,
                      other=0.0).to(tl.float32)
        dg0 = dy0 * q0

        # g = h(z) on this tile's rows, and the weight gradients. Runtime loops over the taps
        # (here and below): unrolled inside the tile loop, every tap's filter and shifted
        # loads were hoisted at once (184 registers for bf16 instead of 106)
        g = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for j in tl.range(0, K, loop_unroll_factor=1):
            src = rows - (K - 1) + j
            ptrs = u_b + src[:, None] * stride_ul + offs_c[None, :]
            msk = (row_ok & (src >= 0))[:, None] & mask_c[None, :]
            z = (tl.load(ptrs + D, mask=msk, other=0.0).to(tl.float32)
                 * tl.load(ptrs + 2 * D, mask=msk, other=0.0).to(tl.float32))
            w = tl.load(W + j * stride_wk + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            g += tl.where(msk, w[None, :] * z, 0.0)
            acc += tl.where(slot == j, tl.sum(dg0 * z, axis=0)[None, :], 0.0)
        if HAS_BIAS:
            g += tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        acc += tl.where(slot == K, tl.sum(dg0, axis=0)[None, :], 0.0)

        # dz[p] = sum_m w[K-1-m] * dg[p+m]: z[p] reaches output row p + m through tap K-1-m.
        w_last = tl.load(W + (K - 1) * stride_wk + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        dz = w_last[None, :] * dg0
        for m in tl.range(1, K, loop_unroll_factor=1):
            r = rows + m
            msk = (r < L)[:, None] & mask_c[None, :]
            dg = (tl.load(dy_b + r[:, None] * stride_dyl + offs_c[None, :], mask=msk,
                          other=0.0).to(tl.float32)
                  * tl.load(u_b + r[:, None] * stride_ul + offs_c[None, :], mask=msk,
                            other=0.0).to(tl.float32))
            w = tl.load(W + (K - 1 - m) * stride_wk + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            dz += w[None, :] * dg

        ptrs = u_b + rows[:, None] * stride_ul + offs_c[None, :]
        k0 = tl.load(ptrs + D, mask=mask, other=0.0).to(tl.float32)
        v0 = tl.load(ptrs + 2 * D, mask=mask, other=0.0).to(tl.float32)
        du_ptrs = DU + pid_b * stride_ub + rows[:, None] * stride_ul + offs_c[None, :]
        tl.store(du_ptrs, (dy0 * g).to(DU.dtype.element_ty), mask=mask)
        tl.store(du_ptrs + D, (dz * v0).to(DU.dtype.element_ty), mask=mask)
        tl.store(du_ptrs + 2 * D, (dz * k0).to(DU.dtype.element_ty), mask=mask)
        tile += 1

    # this program's partials: DW_PART (batch * splits, K + 1, D) (an empty program stores zeros)
    part = pid_b * tl.num_programs(0) + pid_s
    tl.store(DW_PART + (part * (K + 1) + slot) * D + offs_c[None, :], acc,
             mask=(slot <= K) & mask_c[None, :])


# ----------------------------------------------------------------------------- launchers
def hyena_y_fwd(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """u (B, L, 3d), weight (d, K), bias (d,) or None -> y (B, L, d) in u's dtype."""
    u, weight = u.contiguous(), weight.contiguous()
    batch, length, width3 = u.shape
    d = width3 // 3
    y = torch.empty((batch, length, d), device=u.device, dtype=u.dtype)
    if y.numel() == 0:
        return y
    bn, bc, warps = fit_tiles(_FWD_TILES, length, d, weight.shape[1], interpreted=interpreting())
    with on_device(u):
        _hyena_y_fwd_kernel[(triton.cdiv(length, bn), triton.cdiv(d, bc), batch)](
            u, taps_major(weight), weight if bias is None else bias.contiguous(), y, length, d,
            u.stride(0), u.stride(1), y.stride(0), y.stride(1), d,
            K=weight.shape[1], HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps)
    return y


def hyena_y_bwd(dy: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (du (B, L, 3d), dweight (d, K), dbias (d,)); dbias even when bias is None."""
    u, weight, dy = u.contiguous(), weight.contiguous(), dy.contiguous()
    batch, length, width3 = u.shape
    d, taps = width3 // 3, weight.shape[1]
    du = torch.empty_like(u)
    db_dtype = weight.dtype if bias is None else bias.dtype
    if du.numel() == 0:
        return du.zero_(), torch.zeros_like(weight), weight.new_zeros(d, dtype=db_dtype)
    bn, bc, warps = fit_tiles(_BWD_TILES, length, d, taps, interpreted=interpreting())
    n_tiles = triton.cdiv(length, bn)
    splits = row_splits(n_tiles, triton.cdiv(d, bc) * batch, u.device)
    # per program: dweight taps 0..K-1 and dbias (row K), summed over its rows
    part = torch.empty((batch * splits, taps + 1, d), device=u.device, dtype=torch.float32)
    with on_device(u):
        _hyena_y_bwd_kernel[(splits, triton.cdiv(d, bc), batch)](
            u, taps_major(weight), weight if bias is None else bias.contiguous(), dy, du, part,
            length, d, triton.cdiv(n_tiles, splits), u.stride(0), u.stride(1), dy.stride(0),
            dy.stride(1), d, K=taps, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_C=bc,
            SLOTS=triton.next_power_of_2(taps + 1), num_warps=warps)
    dw, db = part[:, :taps].sum(0), part[:, taps].sum(0)  # (K, d), (d,): fresh tensors
    return du, dw.t().to(weight.dtype).contiguous(), db.to(db_dtype)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("graftfx::hyena_y_gate", mutates_args=())
def hyena_y_gate_op(u: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """Fused Hyena-Y gate (B, L, 3d) -> (B, L, d); Triton or the fp32 reference (see _dispatch)."""
    if use_triton(u):
        return hyena_y_fwd(u, weight, bias)
    return naive.hyena_y(u, weight, bias).to(u.dtype).contiguous()


@hyena_y_gate_op.register_fake
def _hyena_y_fake(u, weight, bias):
    return u.new_empty((u.shape[0], u.shape[1], u.shape[2] // 3))


@torch.library.custom_op("graftfx::hyena_y_gate_bwd", mutates_args=())
def hyena_y_gate_bwd_op(
        dy: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dweight, dbias) of ``hyena_y_gate``; dbias is returned even without a bias."""
    if use_triton(u):
        return hyena_y_bwd(dy, u, weight, bias)
    return cast_grads(naive.hyena_y_bwd(dy, u, weight, bias), u, weight, bias)


@hyena_y_gate_bwd_op.register_fake
def _hyena_y_bwd_fake(dy, u, weight, bias):
    db_dtype = weight.dtype if bias is None else bias.dtype
    return (u.new_empty(u.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],), dtype=db_dtype))


def _hyena_y_setup(ctx, inputs, output):
    u, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(u, weight, bias)


def _hyena_y_backward(ctx, dy):
    u, weight, bias = ctx.saved_tensors
    du, dw, db = torch.ops.graftfx.hyena_y_gate_bwd(dy, u, weight, bias)
    return du, dw, (db if ctx.has_bias else None)


hyena_y_gate_op.register_autograd(_hyena_y_backward, setup_context=_hyena_y_setup)


# ----------------------------------------------------------------------------- public function
def hyena_y_gate(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Hyena-Y: ``q, k, v = u.chunk(3, -1)``; returns ``q * h(k * v)``.

    u (B, L, 3d); weight (d, K) inner filter (Conv1d tap order: the last tap is the current
    token, so weight[:, -1] = 1 and the rest 0 is the identity); bias (d,) or None.
    Returns (B, L, d) in u's dtype.
    """
    check_activation("u", u, groups=3)
    check_filter("weight", weight, u.shape[-1] // 3, u,
                 "the inner filter over d = u.shape[-1] // 3")
    check_bias("bias", bias, u.shape[-1] // 3, u)
    return torch.ops.graftfx.hyena_y_gate(u, weight, bias)


def hyena_se_gate(u: torch.Tensor, feat_weight: torch.Tensor, feat_bias: torch.Tensor | None,
                  inner_weight: torch.Tensor, inner_bias: torch.Tensor | None = None,
                  backend: str = "graftfx") -> torch.Tensor:
    """Hyena-SE: featurizer short conv over all 3d channels, then the Hyena-Y gate q * h(k * v).

    Two custom ops (``hyena_short_conv``, ``hyena_y_gate``): the featurized (B, L, 3d) tensor is
    materialised once between them. ``backend`` picks the featurizer conv (see ``short_conv``).
    """
    check_activation("u", u, groups=3)
    check_filter("feat_weight", feat_weight, u.shape[-1], u, "one filter per channel of u")
    check_bias("feat_bias", feat_bias, u.shape[-1], u)
    check_filter("inner_weight", inner_weight, u.shape[-1] // 3, u,
                 "the inner filter over d = u.shape[-1] // 3")
    check_bias("inner_bias", inner_bias, u.shape[-1] // 3, u)
    feats = short_conv(u, feat_weight, feat_bias, backend=backend)
    return torch.ops.graftfx.hyena_y_gate(feats, inner_weight, inner_bias)
