"""Non-causal linear attention: softmax(q k^T) v replaced by a positive feature map,

    o_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)   per head,

O(L d Dh) instead of O(L^2 d). ``qkv: d -> 3d`` (q, k, v in head order), the kernel
``graftfx.kernels.linear_attn``, ``proj: d -> out_width``. ``init="copy"`` starts q/k/v/out
from the original attention's projections (``Region.weights``); ``init="fresh"`` is random.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from graftfx.kernels.linear_attn import FEATURE_MAPS, linear_attention
from graftfx.kernels.linear_attn.noncausal import MAX_HEAD_DIM
from graftfx.rewrites.registry import register_operator

INITS = ("copy", "fresh")


@dataclass
class LinearAttentionConfig:
    heads: int | None = None       # default: the region's head count
    feature_map: str = "elu"       # "elu" (elu + 1) or "relu"
    eps: float = 1e-6              # added to the normaliser phi(q) . sum phi(k)
    init: str = "copy"             # "copy" the original q/k/v/out projections, or "fresh"

    def __post_init__(self):
        if self.heads is not None and (isinstance(self.heads, bool) or not isinstance(self.heads, int)
                                       or self.heads < 1):
            raise ValueError(f"heads must be a positive integer, got {self.heads!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {', '.join(FEATURE_MAPS)}, "
                             f"got {self.feature_map!r}")
        if (isinstance(self.eps, bool) or not isinstance(self.eps, (int, float))
                or not math.isfinite(self.eps) or self.eps <= 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


@register_operator("linear_attention", config=LinearAttentionConfig, kinds=("self_attention",),
                   loss="l1", description="non-causal linear attention, phi = elu+1 or relu, O(L d Dh)")
class LinearAttention(nn.Module):
    def __init__(self, dim: int, config: LinearAttentionConfig, grid=None, *, heads: int | None = None,
                 out_dim: int | None = None):
        super().__init__()
        heads = config.heads or heads
        if heads is None:
            raise ValueError("heads is unknown for this region; set the heads option")
        if dim % heads:
            raise ValueError(f"heads={heads} must divide the width {dim}; choose a divisor of {dim}")
        if dim // heads > MAX_HEAD_DIM:
            raise ValueError(f"heads={heads} gives head dim {dim // heads} > {MAX_HEAD_DIM}; use more heads")
        self.config, self.grid = config, grid
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, out_dim or dim)

    @classmethod
    def from_region(cls, region, **options):
        config = LinearAttentionConfig(**options)
        mod = cls(region.width, config, grid=region.grid, heads=region.heads, out_dim=region.out_width)
        if config.init == "copy":
            mod.copy_attention_weights(region.weights)
        return mod

    @torch.no_grad()
    def copy_attention_weights(self, weights: dict) -> None:
        """Take q/k/v/out from the original attention (``Region.weights`` layout, heads in order)."""
        missing = [f"{n}.weight" for n in ("q", "k", "v", "out") if f"{n}.weight" not in weights]
        if missing:
            raise ValueError(f"init='copy' needs the original attention weights ({', '.join(missing)} "
                             f"missing from the region); use init='fresh'")
        qkv_w = torch.cat([weights[f"{n}.weight"] for n in ("q", "k", "v")])
        if qkv_w.shape != self.qkv.weight.shape or weights["out.weight"].shape != self.proj.weight.shape:
            raise ValueError(f"init='copy': original q/k/v/out shapes {tuple(qkv_w.shape)}, "
                             f"{tuple(weights['out.weight'].shape)} do not fit this operator; "
                             f"use init='fresh'")
        self.qkv.weight.copy_(qkv_w)
        self.proj.weight.copy_(weights["out.weight"])
        for layer, names in ((self.qkv, ("q", "k", "v")), (self.proj, ("out",))):
            biases = [weights.get(f"{n}.bias") for n in names]
            sizes = [layer.out_features // len(names)] * len(names)
            layer.bias.copy_(torch.cat([b if b is not None else layer.bias.new_zeros(s)
                                        for b, s in zip(biases, sizes)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # (B, L, D) -> (B, L, out_dim)
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = linear_attention(q, k, v, self.config.feature_map, self.config.eps)   # (B, H, L, Dh)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))

    def flops(self, tokens: int) -> int:
        d = self.qkv.in_features
        projections = 2 * tokens * d * (3 * d) + 2 * tokens * d * self.proj.out_features
        # per head: state phi(K)^T V and outputs phi(Q) S (2 L Dh^2 each), normaliser (2 L Dh)
        core = 4 * tokens * d * self.head_dim + 2 * tokens * d
        return projections + core
