"""Registries: operator name -> operator spec, pattern name -> matcher.

The engine never imports a concrete operator: it asks this registry by the name a rule gives.
Operators register themselves with ``@register_operator``; every module in
``graftfx.rewrites.operators`` is imported on first lookup.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from graftfx.errors import GraftError


@dataclass(frozen=True)
class OperatorSpec:
    name: str
    cls: type                        # nn.Module with classmethod from_region(region, **options)
    config: type                     # dataclass of options, validated in __post_init__
    kinds: tuple[str, ...]           # region kinds it may replace
    loss: str                        # default stage-1 loss: "l1" | "l2" | "huber"
    description: str

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]

    def make_config(self, options: dict[str, Any], where: str = "") -> Any:
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
    """Class decorator: ``@register_operator("hyena_x", config=HyenaConfig, kinds=("self_attention",))``."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"operator {name!r}: config must be a dataclass, got {config!r}")

    def wrap(cls):
        if name in OPERATORS and OPERATORS[name].cls is not cls:
            raise ValueError(f"operator {name!r} is registered twice ({OPERATORS[name].cls} and {cls})")
        if not hasattr(cls, "from_region"):
            raise TypeError(f"operator {name!r}: {cls.__name__} needs a classmethod from_region")
        summary = description or ((cls.__doc__ or "").strip().splitlines() or [name])[0]
        OPERATORS[name] = OperatorSpec(name, cls, config, tuple(kinds), loss, summary)
        if "operator_name" not in cls.__dict__:
            cls.operator_name = name
        return cls

    return wrap


def register_pattern(name: str, matcher: Callable, description: str = "") -> PatternSpec:
    spec = PatternSpec(name, matcher, description)
    PATTERNS[name] = spec
    return spec


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in ("graftfx.rewrites.operators", "graftfx.rewrites.patterns"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{info.name}")


def _lookup(table: dict, what: str, name: str):
    _load_builtins()
    if name not in table:
        near = difflib.get_close_matches(name, table, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise GraftError(f"unknown {what} {name!r}{hint}; valid choices: {', '.join(sorted(table))}")
    return table[name]


def get_operator(name: str) -> OperatorSpec:
    return _lookup(OPERATORS, "operator", name)


def get_pattern(name: str) -> PatternSpec:
    return _lookup(PATTERNS, "pattern", name)


def operators() -> dict[str, OperatorSpec]:
    _load_builtins()
    return dict(OPERATORS)


def patterns() -> dict[str, PatternSpec]:
    _load_builtins()
    return dict(PATTERNS)
