"""``explain(model, rules)``: for every rule, what matched and, where nothing or fewer regions
than the model has blocks matched, the nearest candidates and the condition each one failed;
whether the rule's operator can be built for every region it selected (checked on the meta
device: options that fail only against a real region, such as heads not dividing its width);
which regions it refuses (a key-padding mask the operator does not take) and what it leaves out
(a rotary embedding or bias it does not apply). Attention rules also name every attention core of
the graph that no attention pattern matched, with the condition it failed. Structural rules
(``pattern = "block"``) list the blocks they group (``blocks.0+1``) or drop, and the blocks they
refuse (a selected block with no selected neighbour to pair with)."""
from __future__ import annotations

from dataclasses import dataclass, field

from graftfx.errors import GraftError
from graftfx.match.match import match
from graftfx.match.paths import block_prefix
from graftfx.match.region import CAUSAL_SELF_ATTENTION, CROSS_ATTENTION, JOINT_ATTENTION, SELF_ATTENTION
from graftfx.match.report import Candidate
from graftfx.select.select import contents, select
from graftfx.splice.splice import build_operator
from graftfx.trace.tracer import TracedGraph, module_path, trace


ATTENTION_KINDS = (SELF_ATTENTION, CAUSAL_SELF_ATTENTION, CROSS_ATTENTION, JOINT_ATTENTION)


@dataclass
class RuleExplanation:
    rule: str
    pattern: str
    operator: str
    matched: list[str]
    selected: list[str]
    blocks: int                                  # numbered blocks the model has
    missing_blocks: list[str] = field(default_factory=list)
    near_misses: list[Candidate] = field(default_factory=list)
    contains: str = ""
    errors: list[str] = field(default_factory=list)   # GraftErrors building the operator for a region
    refused: list[str] = field(default_factory=list)  # regions the operator cannot take, and why
    notes: list[str] = field(default_factory=list)    # what the operator leaves out
    unmatched: list[Candidate] = field(default_factory=list)  # attention cores no attention pattern matched

    def __str__(self) -> str:
        head = (f"rule {self.rule} ({self.pattern} -> {self.operator}): matched {len(self.matched)}"
                + (f" in {self.blocks} blocks" if self.blocks else "") + f", selected {len(self.selected)}")
        lines = [head]
        if self.selected:
            lines.append("  selected: " + ", ".join(self.selected))
        if not self.matched:
            lines.append(f"  nothing matched; the model contains: {self.contains}")
        elif self.missing_blocks:
            lines.append("  no match in: " + ", ".join(self.missing_blocks))
        for error in self.errors:
            lines.append(f"  cannot build: {error}")
        for why in self.refused:
            lines.append(f"  refused: {why}")
        for note in _dedupe(self.notes):
            lines.append(f"  note: {note}")
        if self.unmatched:
            lines.append(f"  attention cores not matched ({len(self.unmatched)}):")
            lines += [f"    {c}" for c in self.unmatched]
        if self.near_misses and (not self.matched or self.missing_blocks):
            lines.append("  nearest candidates:")
            lines += [f"    {c}" for c in self.near_misses[:12]]
            if len(self.near_misses) > 12:
                lines.append(f"    ... {len(self.near_misses) - 12} more")
        return "\n".join(lines)


def explain(model, rules, example_inputs=(), example_kwargs=None) -> list[RuleExplanation]:
    traced = model if isinstance(model, TracedGraph) else trace(model, example_inputs, example_kwargs)
    plan = select(traced, rules, strict=False)
    blocks = numbered_blocks(traced)
    out = []
    for o in plan.outcomes:
        matched_blocks = {block_prefix(r.path) for r in o.report.regions}
        missing = [b for b in blocks if b not in matched_blocks] if o.report.regions else []
        misses = o.report.near_misses
        if missing:  # the candidates that explain the gaps first
            misses = sorted(misses, key=lambda c: block_prefix(c.path) not in missing)
        out.append(RuleExplanation(o.rule.name, o.rule.pattern, o.rule.operator, [r.path for r in o.report.regions],
                                   [r.path for r in o.chosen], len(blocks), missing, list(misses),
                                   contents(traced) if not o.report.regions else "",
                                   [] if o.rule.structural else _build_errors(o.rule, o.chosen),
                                   [why for _, why in o.refused], list(o.notes) + _group_notes(o),
                                   unmatched_attention(traced) if o.rule.pattern in ATTENTION_KINDS else []))
    return out


def unmatched_attention(traced: TracedGraph) -> list[Candidate]:
    """Attention cores of the graph that no built-in attention pattern made a region of."""
    found = {}
    region_cores = set()
    for kind in ATTENTION_KINDS:
        report = match(traced, kind)
        region_cores |= {r.details.get("core") for r in report.regions}
        for c in report.near_misses:
            found.setdefault(c.anchor, c)
    return [c for anchor, c in found.items() if anchor not in region_cores
            and not c.reason.startswith(("attention found, but", "softmax/attention found, but"))]


def _group_notes(outcome) -> list[str]:
    if not outcome.rule.structural or not outcome.groups:
        return []
    from graftfx.splice.structure import group_path

    word = "drops" if len(outcome.groups[0]) == 1 else "rewrites"
    return [f"{outcome.rule.operator} {word} " + ", ".join(group_path([r.path for r in g]) for g in outcome.groups)]


def _dedupe(lines):
    return list(dict.fromkeys(lines))


def _build_errors(rule, regions) -> list[str]:
    """The operator built for each region on the meta device: nothing is allocated."""
    errors = []
    for region in regions:
        try:
            build_operator(rule, region, device="meta")
        except GraftError as e:
            errors.append(str(e))
    return errors


def numbered_blocks(traced: TracedGraph) -> list[str]:
    """Distinct 'container.N' prefixes of the graph's module paths, in order (blocks.0, ...)."""
    seen: dict[str, None] = {}
    for node in traced.graph.nodes:
        b = block_prefix(module_path(node))
        if b:
            seen.setdefault(b, None)
    # keep the container that has the most numbered children (the transformer blocks)
    by_container: dict[str, list[str]] = {}
    for b in seen:
        by_container.setdefault(b.rsplit(".", 1)[0], []).append(b)
    return max(by_container.values(), key=len) if by_container else []
