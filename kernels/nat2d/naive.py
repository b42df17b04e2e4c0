"""2D neighbourhood attention, plain PyTorch in fp32: the oracle for the Triton kernel.

Tokens lie on an (H, W) grid in raster order. The query at (i, j) attends to the
kernel_size x kernel_size keys of the window centred on it, shifted inward at the borders
(NATTEN's convention): rows ``s .. s + k - 1`` with ``s = clamp(i - k // 2, 0, H - k)``, and
the same for columns. Every query sees exactly k*k keys when k <= H, W; along an axis shorter
than k the window covers the whole axis.
"""
from __future__ import annotations

import torch


def window_start(pos: torch.Tensor, size: int, kernel_size: int) -> torch.Tensor:
    """First row (or column) of the window of each position along an axis of ``size``."""
    return (pos - kernel_size // 2).clamp(max=max(size - kernel_size, 0)).clamp(min=0)


def nat2d_mask(height: int, width: int, kernel_size: int, device=None) -> torch.Tensor:
    """(L, L) bool with L = height * width, True where query q may attend to key k."""
    rows = torch.arange(height, device=device).repeat_interleave(width)  # token -> row
    cols = torch.arange(width, device=device).repeat(height)             # token -> column
    r0 = window_start(rows, height, kernel_size)
    c0 = window_start(cols, width, kernel_size)
    in_rows = (rows[None, :] >= r0[:, None]) & (rows[None, :] < r0[:, None] + kernel_size)
    in_cols = (cols[None, :] >= c0[:, None]) & (cols[None, :] < c0[:, None] + kernel_size)
    return in_rows & in_cols


def naive_nat2d(q, k, v, grid: tuple[int, int], kernel_size: int, scale: float | None = None):
    """q, k, v: (B, heads, H*W, Dh) -> (o (B, heads, L, Dh) fp32, lse (B, heads, L) fp32).

    Dense attention under the neighbourhood mask; differentiable with autograd.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.float(), k.float(), v.float()
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~nat2d_mask(*grid, kernel_size, q.device), float("-inf"))
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def naive_nat2d_bwd(do, dlse, q, k, v, grid: tuple[int, int], kernel_size: int,
                    scale: float | None = None):
    """Closed-form gradients of ``naive_nat2d`` (dq, dk, dv in fp32), for paths without autograd.

    With P = softmax(S): dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O) + dlse),
    dQ = scale dS K, dK = scale dS^T Q. Tests check it against autograd through ``naive_nat2d``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, do = q.float(), k.float(), v.float(), do.float()
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~nat2d_mask(*grid, kernel_size, q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    delta = (do * (p @ v)).sum(-1) - (0.0 if dlse is None else dlse.float())
    ds = p * (do @ v.transpose(-1, -2) - delta[..., None])
    return scale * ds @ k, scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do
