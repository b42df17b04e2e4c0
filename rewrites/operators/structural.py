"""Structural operators: rules that rewrite whole blocks instead of one region.

They pair with the ``block`` pattern (``rewrites/patterns/blocks.py``) and are applied by
``graftfx.splice.structure`` (see docs/structural.md for the exact forms and why):

- ``parallel_pairs``: blocks (i, i+1) -> one parallel block, stage by stage:
  ``h = x + a_i(x) + a_{i+1}(x); y = h + m_i(h) + m_{i+1}(h)`` (PixArt's cross-attention stage in
  between the same way); every branch keeps its own adaLN conditioning and weights, copied from
  the two originals. Depth halves; trainable in stage 1 as one module on the pair's boundary.
- ``drop_blocks``: the selected blocks are removed (y = x): depth pruning, nothing to train in
  stage 1 (stage 2 only). ``select = { every_other = true }`` drops blocks 1, 3, 5, ...
- ``merge_blocks``: blocks (i, i+1) -> one block of block i's structure whose every weight is
  the mean of the two blocks' (``weights = "mean"``) or block i's (``"first"``); trainable as
  one module on the pair's boundary, like a parallel pair.

Pairs are formed from the selected blocks left to right: i and i+1 both selected and i not
already in a pair (``select = {}`` pairs (0,1), (2,3), ...; ``indices = [2, 3]`` the pair (2,3);
``range = [0, 4]`` the pairs (0,1), (2,3)).
"""
from __future__ import annotations

from dataclasses import dataclass

from graftfx.registry import register_structural

WEIGHTS = ("mean", "first")


@dataclass
class ParallelPairsConfig:
    """No options: the parallel form and its initialisation are fixed (docs/structural.md)."""


@dataclass
class DropBlocksConfig:
    """No options."""


@dataclass
class MergeBlocksConfig:
    weights: str = "mean"          # "mean" of the two blocks' weights, or "first" (block i's)

    def __post_init__(self):
        if not isinstance(self.weights, str) or self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")


register_structural("parallel_pairs", config=ParallelPairsConfig, form="parallel", group=2, loss="l2",
                    description="blocks (i, i+1) -> one parallel block: h = x + a_i(x) + a_i+1(x); "
                                "y = h + m_i(h) + m_i+1(h)")
register_structural("drop_blocks", config=DropBlocksConfig, form="drop", group=1, loss="l2",
                    description="remove the selected blocks (depth pruning)")
register_structural("merge_blocks", config=MergeBlocksConfig, form="merge", group=2, loss="l2",
                    description="blocks (i, i+1) -> one block with the mean of their weights")
