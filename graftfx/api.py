"""The user's verb: ``graft(model, rules, example_inputs)`` = trace -> select (match) -> splice."""
from __future__ import annotations

import torch.nn as nn

from .select.select import Plan, select
from .splice.splice import GraftedModule, splice
from .trace.tracer import TracedGraph, trace


def graft(model: nn.Module, rules, example_inputs=(), example_kwargs: dict | None = None, *,
          tracer: str = "auto", grid: tuple[int, int] | None = None, allow_imports: bool = False) -> GraftedModule:
    """Trace ``model``, match and select with ``rules`` (a TOML path, a Rule or a list of Rules),
    splice the replacements and return the grafted model (same call signature).

    Modules outside the replaced regions are shared with ``model``, not copied.
    """
    from graftfx.rules import load_rules

    traced = trace(model, example_inputs, example_kwargs, tracer=tracer, grid=grid)
    return splice(select(traced, load_rules(rules, allow_imports=allow_imports)))


def plan(model: nn.Module, rules, example_inputs=(), example_kwargs: dict | None = None, **kw) -> Plan:
    """trace + select without splicing: what ``graft`` would replace."""
    traced = model if isinstance(model, TracedGraph) else trace(model, example_inputs, example_kwargs, **kw)
    return select(traced, rules)
