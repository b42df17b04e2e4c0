"""graftfx: graft new operators into pretrained diffusion transformers through FX rewrites.

    grafted = graftfx.graft(model, "dit-xl2-mha-hyena_x-50p.toml", example_inputs)

The steps stay callable one by one::

    traced = graftfx.trace(model, example_inputs)     # FX graph, module paths, shapes
    report = graftfx.match(traced, "self_attention")  # records; nothing changes yet
    plan = graftfx.select(traced, rules)              # which regions each rule replaces
    grafted = graftfx.splice(plan)                    # one call_module per region
"""
from ._layout import install as _install_layout

_install_layout()

from ._version import __version__  # noqa: E402
from .api import graft, plan  # noqa: E402
from .errors import GraftError  # noqa: E402
from .export import export_grafted, load_grafted  # noqa: E402
from .inspect import explain, inspect  # noqa: E402
from .match import Candidate, MatchReport, Region, match, match_all  # noqa: E402
from .rules import Rule, RuleSet, Select, load_rules  # noqa: E402
from .select import Plan, select  # noqa: E402
from .splice import GraftedModule, splice  # noqa: E402
from .trace import TracedGraph, trace  # noqa: E402

__all__ = ["graft", "plan", "inspect", "explain", "export_grafted", "load_grafted", "GraftedTransformer",
           "load_grafted_transformer", "graft_transformer", "trace", "match", "match_all", "select", "splice", "load_rules", "Rule",
           "RuleSet", "Select", "Region", "MatchReport", "Candidate", "Plan", "GraftedModule",
           "TracedGraph", "GraftError", "__version__"]


def __getattr__(name):   # the diffusers pipeline component imports diffusers: only when asked for
    if name in ("GraftedTransformer", "load_grafted_transformer", "graft_transformer"):
        from .export import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
