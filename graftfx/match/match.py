"""``match(traced, pattern)``: find regions. Nothing in the graph changes until a splice."""
from __future__ import annotations

from graftfx.registry import get_pattern, patterns
from graftfx.trace.tracer import TracedGraph

from .report import MatchReport


def match(traced: TracedGraph, pattern: str) -> MatchReport:
    """Regions of ``traced`` that ``pattern`` (a registered pattern name) matches."""
    return get_pattern(pattern).matcher(traced)


def match_all(traced: TracedGraph) -> dict[str, MatchReport]:
    """Every registered pattern's report, by pattern name."""
    return {name: spec.matcher(traced) for name, spec in patterns().items()}
