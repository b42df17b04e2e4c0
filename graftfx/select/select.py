"""``select(traced, rules)``: apply each rule's selection to what its pattern matched -> a plan.

Structural rules (``pattern = "block"``: parallel_pairs, drop_blocks, merge_blocks) are selected
first, whatever their place in the file; their groups are ``Plan.structural``. Operator rules
are then selected on the same (original) graph with the same block numbering: a region inside a
dropped block is skipped; one inside a parallel pair is kept and ends up inside the pair's
module; one inside a merged pair is refused (the merged block's weights are no longer block i's).
"""
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
    groups: list[tuple[Region, ...]] = field(default_factory=list)    # structural rules: blocks per rewrite


@dataclass
class Plan:
    traced: TracedGraph
    rules: RuleSet
    outcomes: list[RuleOutcome]

    @property
    def selected(self) -> list[tuple[Rule, Region]]:
        """(operator rule, region) for every region an operator replaces (structural rules aside)."""
        return [(o.rule, r) for o in self.outcomes if not o.rule.structural for r in o.chosen]

    @property
    def structural(self) -> list[tuple[Rule, tuple[Region, ...]]]:
        """(structural rule, the blocks of one rewrite) in graph order: pairs, or single dropped blocks."""
        return [(o.rule, g) for o in self.outcomes if o.rule.structural for g in o.groups]

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
    outcomes = {}
    owners: dict[str, tuple[Rule, str]] = {}     # block path -> (structural rule, form)
    for i, rule in enumerate(ruleset):
        if rule.structural:
            outcomes[i] = _select_blocks(traced, rule, owners, strict)
    for i, rule in enumerate(ruleset):
        if rule.structural:
            continue
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
            elif (owner := _owner(region, owners)) is not None and owner[1] == "drop":
                outcome.skipped.append((region, f"its block is dropped by rule {owner[0].name!r}"))
            elif owner is not None and owner[1] == "merge":
                why = (f"{region.path} lies in a block that rule {owner[0].name!r} merges ({owner[0].operator}): a "
                       "merged block's weights are no longer one block's; exclude the region, or use parallel_pairs")
                if strict:
                    raise GraftError(f"{rule.where}{why}")
                outcome.refused.append((region, why))
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
        outcomes[i] = outcome
    return Plan(traced, ruleset, [outcomes[i] for i in range(len(ruleset))])


def _owner(region: Region, owners: dict):
    from graftfx.match.block import under

    for path, owner in owners.items():
        if under(region.path, path):
            return owner
    return None


def _select_blocks(traced: TracedGraph, rule: Rule, owners: dict, strict: bool) -> RuleOutcome:
    """A structural rule's outcome: the blocks its selection keeps, grouped (pairs for
    parallel_pairs and merge_blocks, single blocks for drop_blocks), left to right."""
    from graftfx.registry import get_structural

    spec = get_structural(rule.operator, rule.where)
    report = match(traced, rule.pattern)
    outcome = RuleOutcome(rule, report)
    blocks = sorted((r for r in report.regions if r.block_index is not None), key=lambda r: r.block_index)
    depth = max((r.block_index for r in blocks), default=-1) + 1
    try:
        keep = rule.select.blocks(depth) if rule.select.by_index else None
    except GraftError as e:
        raise GraftError(f"{rule.where}{e}") from None
    chosen = []
    for region in blocks:
        if keep is not None and region.block_index not in keep:
            outcome.skipped.append((region, "not in the selected blocks"))
        elif not rule.select.admits_path(region.path):
            outcome.skipped.append((region, "path not selected"))
        elif region.path in owners:
            outcome.skipped.append((region, f"already rewritten by rule {owners[region.path][0].name!r}"))
        else:
            chosen.append(region)
    if spec.group == 1:
        groups = [(r,) for r in chosen]
    else:
        groups, used = [], set()
        by_index = {r.block_index: r for r in chosen}
        for region in chosen:
            i = region.block_index
            if i in used:
                continue
            mate = by_index.get(i + 1)
            if mate is None and region is chosen[-1] and not rule.select.by_index and rule.select.paths is None:
                outcome.skipped.append((region, "the last block of an odd depth has no pair; it stays as it is"))
                continue
            if mate is None:
                why = (f"block {region.path} is selected but block {i + 1} is not, so it has no pair; "
                       "select consecutive pairs (e.g. indices = [2, 3], range = [0, 4] or select = { })")
                if strict:
                    raise GraftError(f"{rule.where}{why}")
                outcome.refused.append((region, why))
                continue
            if mate.input is not region.output:
                why = (f"blocks {region.path} and {mate.path} are not consecutive in the graph ({mate.path} reads "
                       f"{mate.input.name}, not {region.path}'s output {region.output.name}); {rule.operator} pairs a "
                       "block with the one that reads its output: select other blocks")
                if strict:
                    raise GraftError(f"{rule.where}{why}")
                outcome.refused.append((region, why))
                continue
            if mate.stages != region.stages:
                why = (f"blocks {region.path} ({' -> '.join(region.stages)}) and {mate.path} "
                       f"({' -> '.join(mate.stages)}) have different stages; {rule.operator} pairs blocks of one kind")
                if strict:
                    raise GraftError(f"{rule.where}{why}")
                outcome.refused.append((region, why))
                continue
            used |= {i, i + 1}
            groups.append((region, mate))
    for group in groups:
        for region in group:
            owners[region.path] = (rule, spec.form)
    outcome.chosen = [r for g in groups for r in g]
    outcome.groups = groups
    if strict and not report.regions:
        misses = "; ".join(str(c) for c in report.near_misses[:3])
        raise GraftError(f"{rule.where}pattern {rule.pattern!r} found no transformer block in "
                         f"{type(traced.model).__name__}; the model contains: {contents(traced)}"
                         + (f"; nearest: {misses}" if misses else ""))
    if strict and not groups:
        raise GraftError(f"{rule.where}selected none of the {len(report.regions)} blocks "
                         f"({_paths(report.regions)}); check its select table")
    return outcome


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
