"""``inspect(model, rules)``: what a model contains, what the rules would replace, and the result.

The same data feeds the CLI table, the JSON, and a self-contained HTML report with the
before/after rendering of one block. Structural rules show as the model's depth before and
after, the parallel / merged pairs and dropped blocks in the table (one row per block), in the
diff, and in the SVG (the two blocks before, the parallel block's own graph after).
"""
from __future__ import annotations

import difflib
import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from graftfx.io import atomic_write_text
from graftfx.match.cost import count_params, graph_flops, module_flops
from graftfx.match.paths import block_prefix
from graftfx.match.match import match_all
from graftfx.select.select import Plan, select
from graftfx.splice.splice import GraftedModule, splice
from graftfx.trace.tracer import TracedGraph, trace

from .render import block_nodes, render_svg


@dataclass
class RegionRow:
    path: str
    kind: str
    width: int
    heads: int | None
    hidden: int | None
    tokens: int | None
    params: int
    flops: int
    selected: bool = False
    rule: str = ""
    operator: str = ""
    params_after: int | None = None
    flops_after: int | None = None


@dataclass
class InspectReport:
    model: str
    tracer: str
    trace_seconds: float
    rows: list[RegionRow]
    totals: dict
    rules: list[dict] = field(default_factory=list)      # per rule: matched/selected/skipped
    diff: str = ""
    block: str = ""
    svg_before: str = ""
    svg_after: str = ""
    renderer: str = ""
    notes: list[str] = field(default_factory=list)
    structure: list[dict] = field(default_factory=list)   # structural edits: form, blocks, path, target

    # -- text ---------------------------------------------------------------------------------
    def table(self) -> str:
        head = ["path", "kind", "shape", "params", "GFLOPs", "selected", "-> operator", "params'", "GFLOPs'"]
        body = []
        for r in self.rows:
            shape = f"D={r.width}" + (f" H={r.heads}" if r.heads else "") + (f" hid={r.hidden}" if r.hidden else "") \
                + (f" L={r.tokens}" if r.tokens else "")
            body.append([r.path or "<root>", r.kind, shape, _count(r.params), f"{r.flops / 1e9:.3f}",
                         "yes" if r.selected else "", r.operator, _count(r.params_after) if r.selected else "",
                         f"{r.flops_after / 1e9:.3f}" if r.selected and r.flops_after is not None else ""])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
        return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])

    def summary(self) -> str:
        t = self.totals
        lines = [f"{self.model}: traced with {self.tracer} in {self.trace_seconds:.2f}s; {len(self.rows)} regions"]
        if "params_after" in t:
            lines.append(f"params {_count(t['params_before'])} -> {_count(t['params_after'])}; "
                         f"GFLOPs/sample {t['flops_before'] / 1e9:.2f} -> {t['flops_after'] / 1e9:.2f}")
        else:
            lines.append(f"params {_count(t['params_before'])}; GFLOPs/sample {t['flops_before'] / 1e9:.2f}")
        if "depth_after" in t and t["depth_after"] != t["depth_before"]:
            kinds = {"parallel": "parallel pairs", "merge": "merged pairs", "drop": "dropped"}
            parts = []
            for form, word in kinds.items():
                paths = [e["path"] for e in self.structure if e["form"] == form]
                if paths:
                    parts.append(f"{word} {', '.join(paths)}")
            lines.append(f"depth {t['depth_before']} -> {t['depth_after']}: " + "; ".join(parts))
        for r in self.rules:
            lines.append(f"rule {r['name']}: matched {r['matched']}, selected {r['selected']}"
                         + (f", skipped {r['skipped']}" if r["skipped"] else ""))
        return "\n".join(lines + self.notes)

    def text(self) -> str:
        return self.summary() + "\n\n" + self.table()

    def to_json(self) -> dict:
        return {"model": self.model, "tracer": self.tracer, "trace_seconds": self.trace_seconds,
                "totals": self.totals, "rules": self.rules, "regions": [asdict(r) for r in self.rows],
                "structure": self.structure,
                "block": self.block, "renderer": self.renderer}

    # -- HTML ---------------------------------------------------------------------------------
    def html(self) -> str:
        esc = html.escape
        rows = "".join(
            f"<tr class='{'sel' if r.selected else ''}'><td>{esc(r.path or '<root>')}</td><td>{r.kind}</td>"
            f"<td>{r.width}</td><td>{r.heads or ''}</td><td>{r.hidden or ''}</td><td>{r.tokens or ''}</td>"
            f"<td>{_count(r.params)}</td><td>{r.flops / 1e9:.3f}</td><td>{'yes' if r.selected else ''}</td>"
            f"<td>{esc(r.operator)}</td><td>{_count(r.params_after) if r.selected else ''}</td>"
            f"<td>{f'{r.flops_after / 1e9:.3f}' if r.selected and r.flops_after is not None else ''}</td></tr>"
            for r in self.rows)
        figures = ""
        if self.svg_before:
            figures = (f"<h2>Block <code>{esc(self.block)}</code> before and after</h2>"
                       f"<div class='figs'><figure>{self.svg_before}<figcaption>before</figcaption></figure>"
                       f"<figure>{self.svg_after}<figcaption>after</figcaption></figure></div>"
                       f"<p class='note'>rendered with {esc(self.renderer)}</p>")
        diff = f"<h2>Graph diff</h2><details><summary>{self.diff.count(chr(10))} lines</summary><pre>{esc(self.diff)}</pre></details>" if self.diff else ""
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>graftfx inspect: {esc(self.model)}</title>
<style>body{{font-family:Helvetica,Arial,sans-serif;margin:2em;color:#212529}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #dee2e6;padding:3px 8px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}
tr.sel{{background:#fff5f5}}.figs{{display:flex;gap:2em;align-items:flex-start;overflow-x:auto}}pre{{font-size:11px;background:#f8f9fa;padding:1em}}
.note{{color:#868e96;font-size:12px}}</style></head><body>
<h1>graftfx inspect: {esc(self.model)}</h1><pre>{esc(self.summary())}</pre>
<h2>Regions</h2><table><tr><th>path</th><th>kind</th><th>D</th><th>heads</th><th>hidden</th><th>L</th><th>params</th>
<th>GFLOPs</th><th>selected</th><th>operator</th><th>params after</th><th>GFLOPs after</th></tr>{rows}</table>
{figures}{diff}</body></html>"""

    def write(self, folder) -> dict[str, Path]:
        """report.html, regions.json, graph.diff, before.svg/after.svg into ``folder`` (atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"report.html": self.html(), "regions.json": json.dumps(self.to_json(), indent=2),
                 "report.txt": self.text() + "\n"}
        if self.diff:
            files["graph.diff"] = self.diff
        if self.svg_before:
            files["before.svg"], files["after.svg"] = self.svg_before, self.svg_after
        return {name: atomic_write_text(folder / name, text) for name, text in files.items()}


def _count(n) -> str:
    if n is None:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def inspect(model, rules=None, example_inputs=(), example_kwargs=None, *, name: str = "", render: bool = True,
            traced: TracedGraph | None = None) -> InspectReport:
    """Trace (unless ``model`` or ``traced`` is a TracedGraph already), match every pattern, and
    with ``rules`` select and splice, returning an InspectReport."""
    if isinstance(model, TracedGraph):
        traced = model
    traced = traced or trace(model, example_inputs, example_kwargs)
    batch = traced.batch_size
    seen: dict[int, RegionRow] = {}
    order = []
    for report in match_all(traced).values():
        for r in report.regions:
            if id(r.output) not in seen:
                seen[id(r.output)] = RegionRow(r.path, r.kind, r.width, r.heads, r.hidden, r.tokens, r.params, r.flops)
                order.append(r)
    totals = {"params_before": count_params(traced.model), "flops_before": graph_flops(traced.gm, batch)}
    result = InspectReport(name or type(traced.model).__name__, traced.tracer, traced.seconds, [], totals,
                           notes=list(traced.notes))
    if rules is not None:
        plan: Plan = select(traced, rules)
        grafted: GraftedModule = splice(plan)
        flops_after = totals["flops_before"]
        for g in grafted.grafts:
            if g.structural:
                continue
            op = grafted.get_submodule(g.target)
            row = seen.get(id(g.region.output))
            if row is None:  # a user pattern's region
                r = g.region
                row = seen[id(r.output)] = RegionRow(r.path, r.kind, r.width, r.heads, r.hidden, r.tokens, r.params, r.flops)
                order.append(r)
            row.selected, row.rule, row.operator = True, g.rule.name, g.operator
            row.params_after = count_params(op)
            row.flops_after = module_flops(op, g.region.tokens or 1, g.region.width)
            flops_after += row.flops_after - row.flops
        flops_after += _structure_rows(traced, grafted, seen, order)
        blocks = [r for r in order if r.kind == "block"]
        edits = list(getattr(grafted, "structure", []) or [])
        totals.update(params_after=count_params(grafted), flops_after=flops_after)
        if blocks:
            totals.update(depth_before=len(blocks), depth_after=len(blocks) - sum(
                len(e.blocks) - (0 if e.form == "drop" else 1) for e in edits))
        result.structure = [e.as_dict() for e in edits]
        result.rules = [{"name": o.rule.name, "pattern": o.rule.pattern, "operator": o.rule.operator,
                         "matched": len(o.report.regions), "selected": len(o.chosen), "skipped": len(o.skipped),
                         "selected_paths": [r.path for r in o.chosen]} for o in plan.outcomes]
        result.diff = "".join(difflib.unified_diff(traced.gm.code.splitlines(True), grafted.code.splitlines(True),
                                                   "before", "after", n=1))
        edit = next(iter(getattr(grafted, "structure", []) or []), None)
        if render and edit is not None:
            result.block = edit.path
            result.svg_before, result.renderer, result.svg_after = _structure_svgs(traced, grafted, edit)
        elif render and grafted.grafts:
            block = block_prefix(grafted.grafts[0].region.path) or grafted.grafts[0].region.path
            result.block = block
            result.svg_before, result.renderer = render_svg(block_nodes(traced.graph, block), traced.gm, f"{block} (before)")
            result.svg_after, _ = render_svg(block_nodes(grafted.graph, block), grafted, f"{block} (after)")
    result.rows = [seen[id(r.output)] for r in order]
    return result


def _structure_rows(traced, grafted, seen: dict, order: list) -> int:
    """Mark the rows of restructured blocks (and of operators moved into a pair's module); return
    the change in FLOPs/sample."""
    from graftfx.match.match import match

    edits = list(getattr(grafted, "structure", []) or [])
    if not edits:
        return 0
    rows = {r.path: seen[id(r.output)] for r in order if r.kind == "block"}
    for r in match(traced, "block").regions:
        if r.path not in rows:
            rows[r.path] = seen[id(r.output)] = RegionRow(r.path, r.kind, r.width, r.heads, r.hidden, r.tokens,
                                                          r.params, r.flops)
            order.append(r)
    delta = 0
    batch = traced.batch_size
    for edit in edits:
        before = sum(rows[b].flops for b in edit.blocks if b in rows)
        if edit.form == "drop":
            after, params = 0, 0
        else:
            module = grafted.get_submodule(edit.target)
            after = graph_flops(module, batch)
            for inner in edit.inner:
                op = grafted.get_submodule(inner.target)
                after += module_flops(op, inner.region.tokens or 1, inner.region.width)
                row = seen.get(id(inner.region.output))
                if row is not None:
                    row.selected, row.rule, row.operator = True, inner.rule.name, f"{inner.operator} (in {edit.path})"
                    row.params_after = count_params(op)
                    row.flops_after = module_flops(op, inner.region.tokens or 1, inner.region.width)
            params = count_params(module)
        for i, path in enumerate(edit.blocks):
            row = rows.get(path)
            if row is None:
                continue
            row.selected, row.rule = True, edit.rule.name
            row.operator = "dropped" if edit.form == "drop" else f"{edit.rule.operator} -> {edit.path}"
            row.params_after = params if i == 0 else 0
            row.flops_after = after if i == 0 else 0
        delta += after - before
    return delta


def _structure_svgs(traced, grafted, edit) -> tuple[str, str, str]:
    """(before svg, renderer, after svg) for one structural edit: the blocks as they were, then
    the new block's own graph (a pair or merged block) or the neighbours a dropped block left."""
    before = [n for b in edit.blocks for n in block_nodes(traced.graph, b)]
    svg_before, renderer = render_svg(before, traced.gm, f"{' + '.join(edit.blocks)} (before)")
    if edit.target:
        module = grafted.get_submodule(edit.target)
        nodes = [n for n in module.graph.nodes if n.op not in ("get_attr",)]
        svg_after, _ = render_svg(nodes, module, f"{edit.path} (after: {edit.form} block {edit.target})")
    else:
        nodes = [n for n in grafted.graph.nodes if n.meta.get("graftfx_path", "").startswith(
            edit.blocks[0].rsplit(".", 1)[0] + ".")][:60]
        svg_after, _ = render_svg(nodes, grafted, f"{edit.path} dropped (after)")
    return svg_before, renderer, svg_after
