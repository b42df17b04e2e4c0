"""``select(traced, rules)``: apply each rule's selection to what its pattern matched -> a plan."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from graftfx.errors import GraftError
from graftfx.match.match import match
from graftfx.match.region import OPTIONAL_FEATURES, REQUIRED_FEATURES, Region
from graftfx.match.report import MatchReport
from graftfx.registry import get_operator, patterns
from graftfx.rules import Rule, RuleSet, load_rules
from graftfx.trace.tracer import TracedGraph


@dataclass
class RuleOutcome:
    """One rule's result: what its pattern matched, what it kept, what it skipped and why."""

    rule: Rule
    report: MatchReport
    chosen: list[Region] = field(default_factory=list)
    skipped: list[tuple[Region, str]] = field(default_factory=list)
    refused: list[tuple[Region, str]] = field(default_factory=list)   # the operator cannot take what it carries
    notes: list[str] = field(default_factory=list)                     # what the operator leaves out


@dataclass
class Plan:
    traced: TracedGraph
    rules: RuleSet
    outcomes: list[RuleOutcome]

    @property
    def selected(self) -> list[tuple[Rule, Region]]:
        return [(o.rule, r) for o in self.outcomes for r in o.chosen]

    def is_selected(self, region: Region) -> bool:
        return any(r is region for _, r in self.selected)


def contents(traced: TracedGraph) -> str:
    """What the model contains, pattern by pattern: 'self_attention x28, mlp x29'."""
    counts = Counter()
    for name, spec in patterns().items():
        counts[name] = len(spec.matcher(traced).regions)
    return ", ".join(f"{k} x{v}" for k, v in counts.items() if v) or "no known region"


def select(traced: TracedGraph, rules, *, strict: bool = True) -> Plan:
    """Match every rule and keep the regions its selection names.

    ``strict``: a rule that matches or selects nothing is an error naming what the model has.
    A region already taken by an earlier rule is skipped for later ones.
    """
    ruleset = load_rules(rules)
    taken: dict[int, str] = {}
    outcomes = []
    for rule in ruleset:
        report = match(traced, rule.pattern)
        outcome = RuleOutcome(rule, report)
        spec = get_operator(rule.operator, rule.where)
        # Index selections count the regions over token sequences in numbered blocks: a
        # timestep-embedding MLP inside a block (a (B, D) input) is never "the block's MLP".
        numbered = [r.block_index for r in report.regions if _in_block(r)]
        depth = max(numbered) + 1 if numbered else 0
        try:
            keep = rule.select.blocks(depth) if rule.select.by_index else None
        except GraftError as e:
            raise GraftError(f"{rule.where}{e}") from None
        for region in report.regions:
            if region.kind not in spec.kinds:
                raise GraftError(f"{rule.where}operator {rule.operator!r} replaces "
                                 f"{' or '.join(spec.kinds)} regions, but {region.path} is {region.kind}; "
                                 f"pick an operator for {region.kind} or another pattern")
            takes = getattr(spec.cls, "takes", frozenset())
            lacking = [f for f in region.features if f in REQUIRED_FEATURES and f not in takes]
            if lacking and _wanted(rule, region, keep):
                why = (f"operator {rule.operator!r} cannot replace {region.path}: it carries a {_WORDS[lacking[0]]}, "
                       f"which {rule.operator} does not take (operators that do: {_takers(lacking[0], region.kind)}); "
                       "pick one of them or exclude the region")
                if strict:
                    raise GraftError(f"{rule.where}{why}")
                outcome.refused.append((region, why))
                continue
            if keep is not None and (not _in_block(region) or region.block_index not in keep):
                outcome.skipped.append((region, "not in the selected blocks"))
            elif not rule.select.admits_path(region.path):
                outcome.skipped.append((region, "path not selected"))
            elif id(region.output) in taken:
                outcome.skipped.append((region, f"already replaced by rule {taken[id(region.output)]!r}"))
            else:
                outcome.chosen.append(region)
                taken[id(region.output)] = rule.name
                for f in region.features:
                    if f in OPTIONAL_FEATURES and f not in takes:
                        outcome.notes.append(f"{rule.operator} does not apply the {_WORDS[f]} of {region.path}: "
                                             "it is trained without it")
        if strict and not report.regions:
            misses = "; ".join(str(c) for c in report.near_misses[:3])
            raise GraftError(f"{rule.where}pattern {rule.pattern!r} matched nothing in "
                             f"{type(traced.model).__name__}; the model contains: {contents(traced)}"
                             + (f"; nearest: {misses}" if misses else ""))
        if strict and not outcome.chosen:
            raise GraftError(f"{rule.where}selected none of the {len(report.regions)} "
                             f"{rule.pattern} regions ({_paths(report.regions)}); check its select table")
        outcomes.append(outcome)
    return Plan(traced, ruleset, outcomes)


_WORDS = {"mask": "key-padding mask", "bias": "additive attention bias (e.g. relative-position bias)",
          "rope": "rotary embedding"}


def _wanted(rule: Rule, region: Region, keep) -> bool:
    """Whether the rule's selection names the region (before anything else is checked)."""
    if keep is not None and (not _in_block(region) or region.block_index not in keep):
        return False
    return rule.select.admits_path(region.path)


def _takers(feature: str, kind: str) -> str:
    from graftfx.registry import operators

    names = [n for n, s in operators().items() if feature in getattr(s.cls, "takes", ()) and kind in s.kinds]
    return ", ".join(names) or "none registered"


def _in_block(region: Region) -> bool:
    return region.block_index is not None and region.tokens is not None


def _paths(regions) -> str:
    paths = [r.path for r in regions]
    return ", ".join(paths[:4]) + (", ..." if len(paths) > 4 else "")
