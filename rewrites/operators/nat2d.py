"""2D neighbourhood attention: multi-head softmax attention in which the token at (i, j) of
the (H, W) token grid (raster order) sees the kernel_size x kernel_size window around it,
shifted inward at the borders (NATTEN's convention; every token sees k*k tokens).

q/k/v/out projections as every attention-family operator (``graftfx.operator``), the core
``graftfx.kernels.nat2d.neighborhood_attention_2d`` (reference: ``naive_nat2d``). The grid is
the region's (``graftfx.match.grid``). ``init="copy"`` starts from the original attention's
projections; with a kernel covering the whole grid the operator is then the original
attention. ``init="fresh"`` is random.
"""
from __future__ import annotations

from dataclasses import dataclass

from graftfx.kernels.nat2d import naive_nat2d, neighborhood_attention_2d
from graftfx.match.grid import region_token_grid, token_grid
from graftfx.operator import AttentionConfig, AttentionOperator
from graftfx.options import check_int
from graftfx.registry import register_operator


@dataclass
class NAT2DConfig(AttentionConfig):
    kernel_size: int = 7           # odd; the window is kernel_size x kernel_size tokens

    def __post_init__(self):
        super().__post_init__()
        check_int("kernel_size", self.kernel_size, 1, odd=True)


@register_operator("nat2d", config=NAT2DConfig, kinds=("self_attention",), loss="l1",
                   description="2D neighbourhood attention, k x k window on the token grid")
class NeighborhoodAttention2D(AttentionOperator):
    @classmethod
    def from_region(cls, region, config):
        if region.tokens is not None:
            region_token_grid(region, who="nat2d")   # fail at build time, not at the first call
        return super().from_region(region, config)

    def kernel(self, q, k, v):
        grid = token_grid(q.shape[2], self.grid, who="nat2d")
        return neighborhood_attention_2d(q, k, v, grid, self.config.kernel_size, scale=self.scale)

    def kernel_reference(self, q, k, v):
        grid = token_grid(q.shape[2], self.grid, who="nat2d")
        return naive_nat2d(q, k, v, grid, self.config.kernel_size, self.scale)[0].to(q.dtype)

    def flops(self, tokens: int) -> int:
        height, width = token_grid(tokens, self.grid, who="nat2d")
        ks = self.config.kernel_size
        pairs = tokens * min(ks, height) * min(ks, width)
        return self.projection_flops(tokens) + 4 * pairs * self.width  # QK^T and PV over each window
