"""Module paths: which block a path sits in, and the path a set of nodes shares."""
from __future__ import annotations


def block_prefix(path: str) -> str:
    """The path up to its first numeric component: ``blocks.3.attn`` -> ``blocks.3`` ('' if none)."""
    parts = path.split(".")
    for i, seg in enumerate(parts):
        if seg.isdigit():
            return ".".join(parts[: i + 1])
    return ""


def block_index(path: str) -> int | None:
    """The first numeric component of a module path: ``blocks.3.attn`` -> 3."""
    prefix = block_prefix(path)
    return int(prefix.rsplit(".", 1)[-1]) if prefix else None


def common_path(paths) -> str:
    """The longest dotted prefix the non-empty ``paths`` share."""
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    common = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common)


def short_name(path: str) -> str:
    """``blocks.13.attn`` -> ``b13.attn`` (for progress bars and plot legends)."""
    return path.replace("transformer_blocks.", "b").replace("blocks.", "b")
