"""Sliding-window attention (the paper's SWA): multi-head softmax attention in which token i
sees only tokens j with |i - j| <= window of the 1D raster sequence (flash-attn
``window_size=(window, window)``, non-causal; the paper uses window 4 and 16 heads).

``qkv: d -> 3d`` (q, k, v in head order), the kernel ``graftfx.kernels.swa``,
``proj: d -> out_width``. ``init="copy"`` starts q/k/v/out from the original attention's
projections (``Region.weights``), so with a window >= L the operator *is* the original
attention; ``init="fresh"`` is random.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from graftfx.kernels.swa import BACKENDS, flash_attn_available, sliding_window_attention
from graftfx.rewrites.registry import register_operator

INITS = ("copy", "fresh")
MAX_HEAD_DIM = 256
DEFAULT_HEADS = 16


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class SWAConfig:
    window: int = 4                # token i attends to j with |i - j| <= window
    heads: int | None = None       # default: the region's heads, else 16
    backend: str = "triton"        # "triton" (graftfx kernel), "flash_attn", "reference"
    init: str = "copy"             # "copy" the original q/k/v/out projections, or "fresh"

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an integer >= 0, got {self.window!r}")
        if self.heads is not None and not _positive_int(self.heads):
            raise ValueError(f"heads must be a positive integer, got {self.heads!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


def resolve_heads(dim: int, heads: int | None, region_heads: int | None) -> int:
    """The option, else the region's head count, else 16; checked against the width."""
    heads = heads or region_heads or DEFAULT_HEADS
    if dim % heads:
        raise ValueError(f"heads={heads} must divide the width {dim}; set the heads option "
                         f"to a divisor of {dim}")
    if dim // heads > MAX_HEAD_DIM:
        raise ValueError(f"heads={heads} gives head dim {dim // heads} > {MAX_HEAD_DIM}; "
                         f"set the heads option higher")
    return heads


@torch.no_grad()
def copy_attention_weights(qkv: nn.Linear, proj: nn.Linear, weights: dict) -> None:
    """Load q/k/v/out from ``Region.weights`` (heads in order) into a packed qkv and a proj."""
    missing = [f"{n}.weight" for n in ("q", "k", "v", "out") if f"{n}.weight" not in weights]
    if missing:
        raise ValueError(f"init='copy' needs the original attention weights ({', '.join(missing)} "
                         f"missing from the region); use init='fresh'")
    qkv_w = torch.cat([weights[f"{n}.weight"] for n in ("q", "k", "v")])
    if qkv_w.shape != qkv.weight.shape or weights["out.weight"].shape != proj.weight.shape:
        raise ValueError(f"init='copy': original q/k/v/out shapes {tuple(qkv_w.shape)}, "
                         f"{tuple(weights['out.weight'].shape)} do not fit this operator; "
                         f"use init='fresh'")
    qkv.weight.copy_(qkv_w)
    proj.weight.copy_(weights["out.weight"])
    for layer, names in ((qkv, ("q", "k", "v")), (proj, ("out",))):
        size = layer.out_features // len(names)
        layer.bias.copy_(torch.cat([weights.get(f"{n}.bias", layer.bias.new_zeros(size))
                                    for n in names]))


def window_pairs(tokens: int, window: int) -> int:
    """Number of (query, key) pairs with |i - j| <= window among ``tokens`` positions."""
    if window >= tokens - 1:
        return tokens * tokens
    return tokens * (2 * window + 1) - window * (window + 1)


@register_operator("swa", config=SWAConfig, kinds=("self_attention",), loss="l1",
                   description="sliding-window attention, |i - j| <= window (paper: 4), multi-head")
class SlidingWindowAttention(nn.Module):
    def __init__(self, dim: int, config: SWAConfig, grid=None, *, heads: int | None = None,
                 out_dim: int | None = None):
        super().__init__()
        self.config, self.grid = config, grid
        self.heads = resolve_heads(dim, config.heads, heads)
        self.head_dim = dim // self.heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, out_dim or dim)
        if config.backend == "flash_attn" and not flash_attn_available():
            warnings.warn("swa: backend='flash_attn' but flash_attn is not installed; "
                          "using graftfx's Triton kernel", stacklevel=2)

    @classmethod
    def from_region(cls, region, **options):
        config = SWAConfig(**options)
        mod = cls(region.width, config, grid=region.grid, heads=region.heads,
                  out_dim=region.out_width)
        if config.init == "copy":
            copy_attention_weights(mod.qkv, mod.proj, region.weights)
        return mod

    def _backend(self, q: torch.Tensor) -> str:
        # flash_attn only where it runs (CUDA, half precision); elsewhere graftfx's kernel.
        runs = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
        if self.config.backend == "flash_attn" and not runs:
            return "triton"
        return self.config.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # (B, L, D) -> (B, L, out_dim)
        B, L, D = x.shape
        qkv = self.qkv(x.to(self.qkv.weight.dtype))
        q, k, v = qkv.view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = sliding_window_attention(q, k, v, self.config.window, backend=self._backend(q))
        return self.proj(o.transpose(1, 2).reshape(B, L, D)).to(x.dtype)

    def flops(self, tokens: int) -> int:
        d = self.qkv.in_features
        projections = 2 * tokens * d * (3 * d) + 2 * tokens * d * self.proj.out_features
        # QK^T and PV over the pairs inside the window, all heads: 2 * 2 * pairs * d
        return projections + 4 * window_pairs(tokens, self.config.window) * d

    def extra_repr(self) -> str:
        return f"heads={self.heads}, window={self.config.window}, backend={self.config.backend!r}"
