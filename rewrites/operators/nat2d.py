"""2D neighbourhood attention: multi-head softmax attention in which the token at (i, j) of
the (H, W) token grid (raster order) sees the kernel_size x kernel_size window around it,
shifted inward at the borders (NATTEN's convention; every token sees k*k tokens).

``qkv: d -> 3d`` (q, k, v in head order), the kernel ``graftfx.kernels.nat2d``,
``proj: d -> out_width``. The grid is the region's, else the square one of its token count.
``init="copy"`` starts q/k/v/out from the original attention's projections; with a kernel
covering the whole grid the operator is then the original attention. ``init="fresh"`` is
random.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from graftfx.kernels.nat2d import neighborhood_attention_2d
from graftfx.rewrites.operators.swa import INITS, copy_attention_weights, resolve_heads
from graftfx.rewrites.registry import register_operator


@dataclass
class NAT2DConfig:
    kernel_size: int = 7           # odd; the window is kernel_size x kernel_size tokens
    heads: int | None = None       # default: the region's heads, else 16
    init: str = "copy"             # "copy" the original q/k/v/out projections, or "fresh"

    def __post_init__(self):
        if (isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int)
                or self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")
        if self.heads is not None and (isinstance(self.heads, bool)
                                       or not isinstance(self.heads, int) or self.heads < 1):
            raise ValueError(f"heads must be a positive integer, got {self.heads!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


def square_grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"nat2d needs the token grid: {tokens} tokens is not a square and the "
                         f"region has no grid; match a region that records its (H, W) grid")
    return side, side


@register_operator("nat2d", config=NAT2DConfig, kinds=("self_attention",), loss="l1",
                   description="2D neighbourhood attention, k x k window on the token grid")
class NeighborhoodAttention2D(nn.Module):
    def __init__(self, dim: int, config: NAT2DConfig, grid=None, *, heads: int | None = None,
                 out_dim: int | None = None):
        super().__init__()
        self.config = config
        self.grid = tuple(grid) if grid is not None else None
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ValueError(f"grid must be (H, W) with H, W >= 1, got {grid!r}")
        self.heads = resolve_heads(dim, config.heads, heads)
        self.head_dim = dim // self.heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, out_dim or dim)

    @classmethod
    def from_region(cls, region, **options):
        config = NAT2DConfig(**options)
        grid = region.grid
        if grid is None and region.tokens is not None:
            grid = square_grid(region.tokens)
        mod = cls(region.width, config, grid=grid, heads=region.heads, out_dim=region.out_width)
        if config.init == "copy":
            copy_attention_weights(mod.qkv, mod.proj, region.weights)
        return mod

    def _grid(self, tokens: int) -> tuple[int, int]:
        if self.grid is None:
            return square_grid(tokens)
        if self.grid[0] * self.grid[1] != tokens:
            raise ValueError(f"nat2d was built for a {self.grid[0]}x{self.grid[1]} token grid "
                             f"but got {tokens} tokens; rebuild it for this resolution")
        return self.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # (B, L, D) -> (B, L, out_dim)
        B, L, D = x.shape
        grid = self._grid(L)
        qkv = self.qkv(x.to(self.qkv.weight.dtype))
        q, k, v = qkv.view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = neighborhood_attention_2d(q, k, v, grid, self.config.kernel_size)
        return self.proj(o.transpose(1, 2).reshape(B, L, D)).to(x.dtype)

    def flops(self, tokens: int) -> int:
        d = self.qkv.in_features
        height, width = self._grid(tokens)
        ks = self.config.kernel_size
        pairs = tokens * min(ks, height) * min(ks, width)
        projections = 2 * tokens * d * (3 * d) + 2 * tokens * d * self.proj.out_features
        return projections + 4 * pairs * d  # QK^T and PV over each window, all heads

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kernel_size={self.config.kernel_size}, grid={self.grid}"
