"""Multi-head attention: the self-grafting baseline (self- or cross-attention).

``init="copy"`` takes the original projections (already in head order in ``Region.weights``),
so the graft reproduces the original exactly; ``init="fresh"`` starts from random weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from graftfx.rewrites.registry import register_operator

INITS = ("copy", "fresh")


@dataclass
class MHAConfig:
    init: str = "copy"
    heads: int | None = None      # default: the region's head count

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.heads is not None and (not isinstance(self.heads, int) or self.heads < 1):
            raise ValueError(f"heads must be a positive integer, got {self.heads!r}")


class _HeadNorm(nn.Module):
    """A q/k norm copied from the original: LayerNorm or RMSNorm over the head dim or the width."""

    def __init__(self, kind: str, shape: int, eps: float, weight, bias):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(weight.clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        self.shape = shape

    def forward(self, x):
        if self.kind == "rms_norm":
            return F.rms_norm(x, (self.shape,), self.weight, self.eps)
        return F.layer_norm(x, (self.shape,), self.weight, self.bias, self.eps)


@register_operator("mha", config=MHAConfig, kinds=("self_attention", "cross_attention"), loss="l1",
                   description="multi-head attention (self-grafting baseline), copied or fresh")
class MHA(nn.Module):
    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, out_dim: int | None = None,
                 scale: float | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.head_dim)
        ctx = context_dim or dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(ctx, dim)
        self.v = nn.Linear(ctx, dim)
        self.out = nn.Linear(dim, out_dim or dim)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None

    @classmethod
    def from_region(cls, region, **options):
        cfg = MHAConfig(**options)
        w = region.weights
        heads = cfg.heads or region.heads
        copy = cfg.init == "copy"
        if copy and heads != region.heads:
            raise ValueError(f"init='copy' needs the original heads={region.heads}, got heads={heads}")
        mod = cls(region.width, heads, context_dim=region.context_width, out_dim=region.out_width,
                  scale=region.details.get("scale") if copy else None)
        if copy:
            with torch.no_grad():
                for name in ("q", "k", "v", "out"):
                    getattr(mod, name).weight.copy_(w[f"{name}.weight"])
                    bias = w.get(f"{name}.bias")
                    getattr(mod, name).bias.copy_(bias) if bias is not None else getattr(mod, name).bias.zero_()
            eps = region.details.get("norm_eps", 1e-6)
            for name in ("q", "k"):
                if region.details.get(f"{name}_norm"):
                    weight, bias = w.get(f"{name}_norm.weight"), w.get(f"{name}_norm.bias")
                    shape = weight.shape[0] if weight is not None else mod.head_dim
                    setattr(mod, f"{name}_norm", _HeadNorm(region.details["norm_kind"], shape, eps, weight, bias))
        return mod

    def _heads(self, t, norm):
        B, L, _ = t.shape
        if norm is not None and norm.shape != self.head_dim:
            t = norm(t)  # a norm over the whole width, before the head split
            norm = None
        t = t.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        return norm(t) if norm is not None else t

    def forward(self, x, context=None):
        ctx = x if context is None else context
        q = self._heads(self.q(x), self.q_norm)      # (B, H, L, Dh)
        k = self._heads(self.k(ctx), self.k_norm)    # (B, H, S, Dh)
        v = self._heads(self.v(ctx), None)           # (B, H, S, Dh)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        B, H, L, Dh = o.shape
        return self.out(o.transpose(1, 2).reshape(B, L, H * Dh))  # (B, L, D)

    def flops(self, tokens: int) -> int:
        d = self.q.in_features
        return 2 * tokens * d * d * 4 + 4 * tokens * tokens * d
