"""The token grid (H, W) of a region, in raster order: one rule for every operator and tool.

A grid the model states (its config, the trace's ``grid=``) wins when it fits the token count;
otherwise a perfect-square token count is taken as a square grid; otherwise there is no grid,
and an operator that needs one says so (``token_grid`` raises naming the fix).
"""
from __future__ import annotations

import math


def square_grid(tokens: int | None) -> tuple[int, int] | None:
    """(s, s) when ``tokens`` = s * s, else None."""
    if not tokens:
        return None
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None


def region_grid(grid, tokens: int | None) -> tuple[int, int] | None:
    """The grid a matched region records: the model's ``grid`` when it fits ``tokens``, else a
    square one, else None."""
    if grid and tokens and grid[0] * grid[1] == tokens:
        return (int(grid[0]), int(grid[1]))
    return square_grid(tokens)


def token_grid(tokens: int, grid=None, *, who: str = "this operator") -> tuple[int, int]:
    """The (H, W) grid of ``tokens`` tokens for an operator built with ``grid`` (or None)."""
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
