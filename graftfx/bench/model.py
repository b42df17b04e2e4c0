"""``graftfx bench --model MODEL --rules FILE``: time the operators at the shapes a model has.

The model is traced (presets on the meta device: no weights materialised), the rules select
regions (``graftfx.select``), regions of one rule with the same shape are grouped, and each
group is timed once: the rule's operator (built by ``build_operator`` from a copy of the
region with random weights on the bench device) against the original region at that shape
(SDPA attention through the ``mha`` operator, or the original MLP), at ``--batch``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .cases import ATTENTION, MLP, OpCase, Shape, region_like
from .crossover import crossover_path
from .runner import Bench, Result, release_memory


@dataclass
class Group:
    rule: object                     # graftfx Rule
    region: object                   # the first region of the group (a graftfx Region)
    paths: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        if len(self.paths) <= 2:
            return ", ".join(self.paths)
        return f"{self.paths[0]} ... {self.paths[-1]}"


def _key(rule_index: int, r) -> tuple:
    weights = tuple(sorted((k, tuple(v.shape)) for k, v in r.weights.items()))
    return (rule_index, r.kind, r.width, r.out_width, r.tokens, r.heads, r.hidden, r.activation,
            r.grid, weights)


def model_groups(spec: str, rules) -> tuple[list[Group], list[str]]:
    """Trace ``spec`` (the CLI's MODEL), select with ``rules``; group the selected regions."""
    import graftfx
    from graftfx.models.zoo import resolve_model
    from graftfx.rules import load_rules

    ruleset = load_rules(rules)
    model, args, kwargs = resolve_model(spec, meta=True, batch=2)
    plan = graftfx.select(graftfx.trace(model, args, kwargs), ruleset)
    index = {id(rule): i for i, rule in enumerate(ruleset)}
    groups: dict[tuple, Group] = {}
    notes = []
    for rule, region in plan.selected:
        if region.kind not in (ATTENTION, MLP):
            notes.append(f"{region.path}: {region.kind} regions are not timed")
            continue
        if not region.tokens:
            notes.append(f"{region.path}: the trace recorded no token count; not timed")
            continue
        g = groups.setdefault(_key(index.get(id(rule), 0), region), Group(rule, region))
        g.paths.append(region.path)
    return list(groups.values()), notes


def run_model(groups: list[Group], batch: int, dtype: str, bench: Bench) -> tuple[list[Result], list[dict]]:
    """Time each group; returns (rows, per-pass totals over all selected regions)."""
    rows: list[Result] = []
    totals = {p: {"pass": p, "original_ms": 0.0, "grafted_ms": 0.0, "complete": True}
              for p in bench.passes}
    for g in groups:
        r = g.region
        shape = Shape(g.rule.name or g.rule.operator, batch, r.tokens, r.width, r.heads, dtype)
        region = region_like(r, bench.device, shape.torch_dtype)
        x = bench.input(shape)
        case = OpCase(g.rule.operator, dict(g.rule.options), r.kind)
        base = bench.baseline(r.kind, region, shape, shape.name, x)
        case_rows = bench.case(case, region, shape, shape.name, x, base)
        deployed = crossover_path(case, bench.device)
        for row in (*base.values(), *case_rows):
            row.regions = len(g.paths)
            row.where = g.where
        rows += [*base.values(), *case_rows]
        for p, t in totals.items():
            b = base.get(p)
            mine = next((c for c in case_rows if c.pass_ == p and c.path == deployed), None)
            if b is None or mine is None or not (b.ok and mine.ok):
                t["complete"] = False
                continue
            t["original_ms"] += len(g.paths) * b.ms
            t["grafted_ms"] += len(g.paths) * mine.ms
        region = x = None
        release_memory(bench.device)
    summary = []
    for t in totals.values():
        t["speedup"] = t["original_ms"] / t["grafted_ms"] if t["complete"] and t["grafted_ms"] else None
        summary.append(t)
    return rows, summary


def default_dtype(device_type: str) -> str:
    """bf16 on a GPU (the paper's setting), fp32 on a CPU."""
    return "bf16" if device_type == "cuda" else "fp32"
