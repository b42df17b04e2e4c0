"""Causal depthwise short conv along the token axis (the Hyena featurizer on its own).

``y[b, t, c] = bias[c] + sum_j weight[c, j] * u[b, t - (K - 1) + j, c]``, zeros before t = 0.
Hyena-SE uses it to featurize q, k, v before the Hyena-Y gate; Hyena-X fuses it into its gate
(``hyena_x.py``) instead.

Reads top to bottom: Triton kernels, launchers ``short_conv_fwd``/``short_conv_bwd``, the custom
ops ``graftfx::hyena_short_conv``/``graftfx::hyena_short_conv_bwd`` with autograd, and the
public ``short_conv`` (which may hand the conv to the ``causal_conv1d`` package on request).

Each program owns a (BLOCK_N tokens x BLOCK_C channels) tile; the K - 1 halo rows above it are
re-read through L1/L2, so HBM sees u and y about once. The backward gives
``du[s] = sum_m weight[K-1-m] * dy[s + m]`` and per-tile partial sums of ``dweight`` and
``dbias`` (reduced over tiles in fp32 by the launcher: deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import interpreting, on_device, optional_backend, use_triton
from . import naive
from .common import (cast_grads, check_activation, check_bias, check_filter, conv_tile, fit_tiles,
                     taps_major)

BACKENDS = ("graftfx", "causal_conv1d")
# (BLOCK_N, BLOCK_C, num_warps) on sm_90: 44-78 registers, no spills (see common.fit_tiles).
_FWD_TILES = (32, 128, 8)
_BWD_TILES = (32, 128, 8)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _short_conv_fwd_kernel(U, W, BIAS, Y, L, C,
                           stride_ub, stride_ul, stride_yb, stride_yl, stride_wk,
                           K: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < L
    mask_c = offs_c < C
    y = conv_tile(U + pid_b * stride_ub, W, BIAS, rows, offs_c, row_ok, mask_c, 0, stride_ul, 1,
                  stride_wk, K, HAS_BIAS, BLOCK_N, BLOCK_C)
    tl.store(Y + pid_b * stride_yb + rows[:, None] * stride_yl + offs_c[None, :],
             y.to(Y.dtype.element_ty), mask=row_ok[:, None] & mask_c[None, :])


@triton.jit
def _short_conv_bwd_kernel(U, W, DY, DU, DW_PART, DB_PART, L, C,
                           stride_ub, stride_ul, stride_dyb, stride_dyl, stride_dub, stride_dul,
                           stride_wk,
                           K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < L
    mask_c = offs_c < C
    mask = row_ok[:, None] & mask_c[None, :]
    u_b = U + pid_b * stride_ub
    dy_b = DY + pid_b * stride_dyb

    # du[s] = sum_m w[K-1-m] * dy[s+m]: output row s + m used u[s] through tap K-1-m.
    dy0 = tl.load(dy_b + rows[:, None] * stride_dyl + offs_c[None, :], mask=mask,
                  other=0.0).to(tl.float32)
    w_last = tl.load(W + (K - 1) * stride_wk + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    du = w_last[None, :] * dy0
    for m in tl.static_range(1, K):
        r = rows + m
        dy = tl.load(dy_b + r[:, None] * stride_dyl + offs_c[None, :],
                     mask=(r < L)[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + (K - 1 - m) * stride_wk + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        du += w[None, :] * dy
    tl.store(DU + pid_b * stride_dub + rows[:, None] * stride_dul + offs_c[None, :],
             du.to(DU.dtype.element_ty), mask=mask)

    # This tile's share of dw[c, j] = sum_t dy[t, c] * u[t - (K-1) + j, c] and db[c] = sum_t dy.
    part = pid_b * tl.num_programs(0) + pid_n
    for j in tl.static_range(K):
        src = rows - (K - 1) + j
        x = tl.load(u_b + src[:, None] * stride_ul + offs_c[None, :],
                    mask=(row_ok & (src >= 0))[:, None] & mask_c[None, :], other=0.0)
        tl.store(DW_PART + (part * K + j) * C + offs_c, tl.sum(dy0 * x.to(tl.float32), axis=0),
                 mask=mask_c)
    tl.store(DB_PART + part * C + offs_c, tl.sum(dy0, axis=0), mask=mask_c)


# ----------------------------------------------------------------------------- launchers
def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def short_conv_fwd(u: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """(B, L, C), (C, K), (C,) or None -> y (B, L, C) in u's dtype (fp32 accumulation)."""
    u, weight = _channels_last(u), weight.contiguous()
    batch, length, channels = u.shape
    y = torch.empty((batch, length, channels), device=u.device, dtype=u.dtype)
    if y.numel() == 0:
        return y
    bn, bc, warps = fit_tiles(_FWD_TILES, length, channels, weight.shape[1], interpreted=interpreting())
    grid = (triton.cdiv(length, bn), triton.cdiv(channels, bc), batch)
    with on_device(u):
        _short_conv_fwd_kernel[grid](
            u, taps_major(weight), weight if bias is None else bias.contiguous(), y, length, channels,
            u.stride(0), u.stride(1), y.stride(0), y.stride(1), channels,
            K=weight.shape[1], HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps)
    return y


def short_conv_bwd(dy: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (du in u's dtype, dweight in weight's dtype, dbias in bias's (else weight's) dtype)."""
    u, weight, dy = _channels_last(u), weight.contiguous(), _channels_last(dy)
    batch, length, channels = u.shape
    taps = weight.shape[1]
    du = torch.empty((batch, length, channels), device=u.device, dtype=u.dtype)
    db_dtype = weight.dtype if bias is None else bias.dtype
    if du.numel() == 0:
        return du.zero_(), torch.zeros_like(weight), weight.new_zeros(channels, dtype=db_dtype)
    bn, bc, warps = fit_tiles(_BWD_TILES, length, channels, taps, interpreted=interpreting())
    n_tiles = triton.cdiv(length, bn)
    dw_part = torch.empty((batch * n_tiles, taps, channels), device=u.device, dtype=torch.float32)
    db_part = torch.empty((batch * n_tiles, channels), device=u.device, dtype=torch.float32)
    with on_device(u):
        _short_conv_bwd_kernel[(n_tiles, triton.cdiv(channels, bc), batch)](
            u, taps_major(weight), dy, du, dw_part, db_part, length, channels,
            u.stride(0), u.stride(1), dy.stride(0), dy.stride(1), du.stride(0), du.stride(1),
            channels, K=taps, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps)
    dw = dw_part.sum(0).t().to(weight.dtype).contiguous()
    return du, dw, db_part.sum(0).to(db_dtype)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("graftfx::hyena_short_conv", mutates_args=())
def short_conv_op(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv along tokens; Triton or the fp32 reference (see _dispatch)."""
    if use_triton(u):
        return short_conv_fwd(u, weight, bias)
    return naive.causal_conv(u, weight, bias).to(u.dtype).contiguous()


@short_conv_op.register_fake
def _short_conv_fake(u, weight, bias):
    return u.new_empty(u.shape)


@torch.library.custom_op("graftfx::hyena_short_conv_bwd", mutates_args=())
def short_conv_bwd_op(
        dy: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dweight, dbias) of ``hyena_short_conv``; dbias is returned even without a bias."""
    if use_triton(u):
        return short_conv_bwd(dy, u, weight, bias)
    return cast_grads(naive.causal_conv_bwd(dy, u, weight), u, weight, bias)


@short_conv_bwd_op.register_fake
def _short_conv_bwd_fake(dy, u, weight, bias):
    db_dtype = weight.dtype if bias is None else bias.dtype
    return (u.new_empty(u.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],), dtype=db_dtype))


def _short_conv_setup(ctx, inputs, output):
    u, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(u, weight, bias)


def _short_conv_backward(ctx, dy):
    u, weight, bias = ctx.saved_tensors
    du, dw, db = torch.ops.graftfx.hyena_short_conv_bwd(dy, u, weight, bias)
    return du, dw, (db if ctx.has_bias else None)


short_conv_op.register_autograd(_short_conv_backward, setup_context=_short_conv_setup)


# ----------------------------------------------------------------------------- public function
def causal_conv1d_available() -> bool:
    """True when the optional ``causal_conv1d`` package imports (it is never required)."""
    return optional_backend("causal_conv1d")


def short_conv(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               backend: str = "graftfx") -> torch.Tensor:
    """Causal depthwise conv along tokens: u (B, L, C), weight (C, K), bias (C,) -> (B, L, C).

    ``backend="graftfx"`` runs graftfx's own custom op (Triton on CUDA); ``"causal_conv1d"``
    hands the conv to that package's ``causal_conv1d_fn`` (CUDA tensors, K in 2..4), which
    must be installed: it is an optional extra and is never chosen silently.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_activation("u", u)
    check_filter("weight", weight, u.shape[-1], u, "one filter per channel")
    check_bias("bias", bias, u.shape[-1], u)
    if backend == "causal_conv1d":
        if not causal_conv1d_available():
            raise ValueError("backend='causal_conv1d' needs the causal_conv1d package "
                             "(pip install causal-conv1d), or use backend='graftfx'")
        if not u.is_cuda or not 2 <= weight.shape[1] <= 4:
            raise ValueError("backend='causal_conv1d' runs CUDA tensors with 2 to 4 taps; "
                             "use backend='graftfx' here")
        from causal_conv1d import causal_conv1d_fn

        # The package wants (B, C, L); a transposed view of channels-last u is accepted as is.
        y = causal_conv1d_fn(u.transpose(1, 2), weight.to(u.dtype),
                             None if bias is None else bias.to(u.dtype), activation=None)
        return y.transpose(1, 2)
    return torch.ops.graftfx.hyena_short_conv(u, weight, bias)
