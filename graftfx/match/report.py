"""What a pattern reports: the regions it matched and the near misses, each with its reason."""
from __future__ import annotations

from dataclasses import dataclass, field

from .region import Region


@dataclass(frozen=True)
class Candidate:
    """Something that looked like the pattern but failed one condition."""

    path: str     # module path, e.g. "blocks.4.attn"
    anchor: str   # the node the pattern started from (e.g. the softmax)
    reason: str   # the condition that failed, in words

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.reason}"


@dataclass
class MatchReport:
    pattern: str
    regions: list[Region] = field(default_factory=list)
    near_misses: list[Candidate] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.regions)


def analysis_cache(traced) -> dict:
    """Per-graph memo for analyses shared by several patterns (e.g. self and cross attention)."""
    cache = traced.__dict__.setdefault("_analysis", {})
    key = id(traced.gm.graph), len(traced.gm.graph.nodes)
    if cache.get("_key") != key:
        cache.clear()
        cache["_key"] = key
    return cache
