"""The token grid (H, W) of a region, in raster order: one rule for every operator and tool.

A region's grid comes from the model, never from its token count alone: the grid the user traced
with (``trace(..., grid=)``) or the model's config states, when it fits the token count; else the
grid the graph itself shows, a (B, C, H, W) or (B, H, W, C) map flattened into exactly these
tokens (a patch embedding, a UNet feature map, a Swin window); else there is no grid, and an
operator that needs one says so (``token_grid`` raises naming the fix). A 16-token text
sequence is not a 4x4 image.
"""
from __future__ import annotations

import math


def square_grid(tokens: int | None) -> tuple[int, int] | None:
    """(s, s) when ``tokens`` = s * s, else None (for synthetic shapes, e.g. benchmarks)."""
    if not tokens:
        return None
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None


def region_grid(traced, x, tokens: int | None) -> tuple[int, int] | None:
    """The grid a region over ``tokens`` tokens of the stream ``x`` records (see the notes)."""
    if not tokens:
        return None
    grid = getattr(traced, "grid", None)
    if grid and grid[0] * grid[1] == tokens:
        return (int(grid[0]), int(grid[1]))
    if x is None:
        return None
    from .streams import stream_origin

    found = {g for g in stream_origin(traced, x).grids if g[0] * g[1] == tokens}
    return found.pop() if len(found) == 1 else None


def token_grid(tokens: int, grid=None, *, who: str = "this operator") -> tuple[int, int]:
    """The (H, W) grid of ``tokens`` tokens for an operator built with ``grid``. Without one
    (an operator built from a hand-made region, e.g. for a benchmark) a square token count is
    taken as a square grid; a matched region never gets here without its grid
    (``region_token_grid``)."""
    if grid is not None:
        grid = tuple(grid)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"{who}: grid must be (H, W) with H, W >= 1, got {grid!r}")
        if grid[0] * grid[1] != tokens:
            raise ValueError(f"{who} was built for a {grid[0]}x{grid[1]} token grid but got {tokens} tokens; "
                             "rebuild it for this resolution")
        return grid
    found = square_grid(tokens)
    if found is None:
        raise ValueError(f"{who} needs the token grid: {tokens} tokens is not a square and the region has no "
                         "grid; trace with grid=(H, W) or match a region that records its grid")
    return found


def region_token_grid(region, *, who: str = "this operator", tokens: int | None = None,
                      grid=None) -> tuple[int, int]:
    """The grid an operator builds for: the region's own. A matched region (one with graph
    nodes) without a grid is an error, whatever its token count: 16 text tokens are not 4x4."""
    tokens = region.tokens if tokens is None else tokens
    grid = region.grid if grid is None else grid
    if grid is None and getattr(region, "input", None) is not None:
        raise ValueError(f"{who} needs the token grid, and {region.path or 'the region'} has none ({tokens} "
                         "tokens that no patch embedding, config or grid= lays out); trace with grid=(H, W)")
    return token_grid(tokens, grid, who=who)
