"""The node.meta / gm.meta keys a traced graph carries, and how export's module paths are read.

Shared by the tracer and the repeats shortcut (which copies nodes and renames their paths).
"""
from __future__ import annotations

import re

PATH = "graftfx_path"    # node.meta key: module path the node came from ("" at the root)
SHAPE = "graftfx_shape"  # node.meta key: output shape at the example inputs (tuple) or None
DTYPE = "graftfx_dtype"
SHAPES_RECORDED = "graftfx_shapes_recorded"   # gm.meta key: SHAPE/DTYPE are already set

_BRACKETS = re.compile(r"\[(\d+)\]")


def normalise_path(path: str) -> str:
    """``L['self'].blocks[3].attn`` (an nn_module_stack entry) -> ``blocks.3.attn``."""
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = _BRACKETS.sub(r".\1", path)
    return path.strip(".")
