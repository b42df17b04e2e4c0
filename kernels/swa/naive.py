"""Sliding-window attention, plain PyTorch in fp32: the oracle for the Triton kernel.

Query ``i`` attends to keys ``j`` with ``|i - j| <= window`` (non-causal, flash-attn's
``window_size=(window, window)``); a window >= L is full attention.
"""
from __future__ import annotations

import torch


def swa_mask(length: int, window: int, device=None) -> torch.Tensor:
    """(L, L) bool, True where query i may attend to key j."""
    i = torch.arange(length, device=device)
    return (i[:, None] - i[None, :]).abs() <= window


def naive_swa(q, k, v, window: int, scale: float | None = None):
    """q, k, v: (B, H, L, Dh) -> (o (B, H, L, Dh) fp32, lse (B, H, L) fp32).

    Dense masked softmax attention; differentiable with autograd.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.float(), k.float(), v.float()
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~swa_mask(q.shape[-2], window, q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ v
    return o, lse


def naive_swa_bwd(do, dlse, q, k, v, window: int, scale: float | None = None):
    """Closed-form gradients of ``naive_swa`` (dq, dk, dv in fp32), for paths without autograd.

    With P = softmax(S): dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O) + dlse),
    dQ = scale dS K, dK = scale dS^T Q. Tests check it against autograd through ``naive_swa``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, do = q.float(), k.float(), v.float(), do.float()
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~swa_mask(q.shape[-2], window, q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = p @ v
    delta = (do * o).sum(-1) - (0.0 if dlse is None else dlse.float())
    ds = p * (do @ v.transpose(-1, -2) - delta[..., None])
    return scale * ds @ k, scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do
