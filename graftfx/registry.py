"""Registries: operator name -> operator spec, pattern name -> matcher.

The engine never imports a concrete operator: it asks this registry by the name a rule gives.
Operators register themselves with ``@register_operator`` and patterns with
``register_pattern``; every module in ``graftfx.rewrites.operators`` and
``graftfx.rewrites.patterns`` is imported on the first lookup, and the registry counts as
loaded only once all of them imported (a broken operator module is an error on every lookup,
never a silently smaller registry).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from graftfx.errors import GraftError

LOSSES = ("l1", "l2", "huber")
PLUGIN_PACKAGES = ("graftfx.rewrites.operators", "graftfx.rewrites.patterns")


@dataclass(frozen=True)
class OperatorSpec:
    name: str
    cls: type                        # a graftfx.operator.Operator subclass
    config: type                     # dataclass of options, validated in __post_init__
    kinds: tuple[str, ...]           # region kinds it may replace
    loss: str                        # default stage-1 loss: "l1" | "l2" | "huber"
    description: str

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]

    def make_config(self, options: dict[str, Any], where: str = "") -> Any:
        """The validated config object for ``options``; a GraftError names what is wrong."""
        if not isinstance(options, dict):
            raise GraftError(f"{where}options of operator {self.name!r} must be a table, got {options!r}")
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise GraftError(
                f"{where}unknown option {unknown[0]!r} for operator {self.name!r}; "
                f"valid options: {', '.join(self.option_names()) or '(none)'}"
            )
        try:
            return self.config(**options)
        except (TypeError, ValueError) as e:
            raise GraftError(f"{where}operator {self.name!r}: {e}") from None


@dataclass(frozen=True)
class PatternSpec:
    name: str
    matcher: Callable              # (TracedGraph) -> MatchReport
    description: str


OPERATORS: dict[str, OperatorSpec] = {}
PATTERNS: dict[str, PatternSpec] = {}
_loaded = False


def register_operator(name: str, *, config: type, kinds: tuple[str, ...], loss: str = "l1",
                      description: str = ""):
    """Class decorator::

        @register_operator("hyena_x", config=HyenaXConfig, kinds=("self_attention",))
        class HyenaX(Operator): ...

    The class must follow the operator protocol (``graftfx.operator``): a classmethod
    ``from_region(region, config)`` and ``flops(tokens)``.
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"operator {name!r}: config must be a dataclass, got {config!r}")
    if loss not in LOSSES:
        raise TypeError(f"operator {name!r}: loss must be one of {', '.join(LOSSES)}, got {loss!r}")

    def wrap(cls):
        from graftfx.operator import Operator

        if name in OPERATORS and OPERATORS[name].cls is not cls:
            raise ValueError(f"operator {name!r} is registered twice ({OPERATORS[name].cls} and {cls})")
        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise TypeError(f"operator {name!r}: {getattr(cls, '__name__', cls)} must subclass graftfx.operator.Operator")
        for method in ("from_region", "flops"):
            if not callable(getattr(cls, method, None)):
                raise TypeError(f"operator {name!r}: {cls.__name__} needs a method {method}() "
                                "(see graftfx.operator)")
        summary = description or ((cls.__doc__ or "").strip().splitlines() or [name])[0]
        OPERATORS[name] = OperatorSpec(name, cls, config, tuple(kinds), loss, summary)
        if "operator_name" not in cls.__dict__:   # a second name (an import path) is an alias only
            cls.operator_name = name
            cls.config_class = config
        return cls

    return wrap


def register_pattern(name: str, matcher: Callable, description: str = "") -> PatternSpec:
    spec = PatternSpec(name, matcher, description)
    PATTERNS[name] = spec
    return spec


def load_plugins() -> None:
    """Import every operator and pattern module once (an import error propagates, every time)."""
    global _loaded
    if _loaded:
        return
    for pkg_name in PLUGIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{info.name}")
    _loaded = True


def _lookup(table: dict, what: str, name: str, where: str = ""):
    load_plugins()
    if not isinstance(name, str) or name not in table:
        near = difflib.get_close_matches(name, table, n=1) if isinstance(name, str) else []
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise GraftError(f"{where}unknown {what} {name!r}{hint}; valid choices: {', '.join(sorted(table))}")
    return table[name]


def get_operator(name: str, where: str = "") -> OperatorSpec:
    return _lookup(OPERATORS, "operator", name, where)


def get_pattern(name: str, where: str = "") -> PatternSpec:
    return _lookup(PATTERNS, "pattern", name, where)


def operators() -> dict[str, OperatorSpec]:
    load_plugins()
    return dict(OPERATORS)


def patterns() -> dict[str, PatternSpec]:
    load_plugins()
    return dict(PATTERNS)


# ---------------------------------------------------------------------------------------------
# Structural operators: rewrites of whole blocks (parallel pairs, dropping, merging), named by a
# rule like an operator but applied by graftfx.splice.structure, not built per region.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StructuralSpec:
    name: str
    config: type                     # dataclass of options, validated in __post_init__
    form: str                        # what graftfx.splice.structure does: "parallel" | "merge" | "drop"
    group: int                       # blocks per group: 2 (pairs) or 1 (drop)
    loss: str                        # default stage-1 loss for the rewritten group
    description: str

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]

    def make_config(self, options: dict[str, Any], where: str = "") -> Any:
        return OperatorSpec.make_config(self, options, where)  # same checks, same messages


STRUCTURAL: dict[str, StructuralSpec] = {}
FORMS = ("parallel", "merge", "drop")


def register_structural(name: str, *, config: type, form: str, group: int, loss: str = "l2",
                        description: str = "") -> StructuralSpec:
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"structural operator {name!r}: config must be a dataclass, got {config!r}")
    if form not in FORMS or group not in (1, 2) or loss not in LOSSES:
        raise TypeError(f"structural operator {name!r}: form must be one of {', '.join(FORMS)}, group 1 or 2, "
                        f"loss one of {', '.join(LOSSES)}")
    if name in OPERATORS:
        raise ValueError(f"structural operator {name!r} clashes with a region operator of that name")
    spec = StructuralSpec(name, config, form, group, loss, description)
    STRUCTURAL[name] = spec
    return spec


def is_structural(name) -> bool:
    load_plugins()
    return isinstance(name, str) and name in STRUCTURAL


def get_structural(name: str, where: str = "") -> StructuralSpec:
    return _lookup(STRUCTURAL, "structural operator", name, where)


def structurals() -> dict[str, StructuralSpec]:
    load_plugins()
    return dict(STRUCTURAL)
