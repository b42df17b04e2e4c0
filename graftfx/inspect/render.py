"""Draw part of a graph as SVG: Graphviz's ``dot`` when installed, else a built-in layered layout."""
from __future__ import annotations

import html
import shutil
import subprocess

import torch.fx as fx

from graftfx.trace.ops import op_kind
from graftfx.trace.tracer import module_path, node_shape

# Fill colours by what a node does.
_COLOURS = {"linear": "#cfe2ff", "sdpa": "#ffd8a8", "softmax": "#ffd8a8", "matmul": "#ffd8a8",
            "layer_norm": "#d3f9d8", "gelu": "#fff3bf", "gelu_tanh": "#fff3bf", "silu": "#fff3bf",
            "graft": "#ffc9c9", "input": "#e9ecef"}


def block_nodes(graph: fx.Graph, prefix: str) -> list[fx.Node]:
    """Nodes whose module path is ``prefix`` or lies under it."""
    return [n for n in graph.nodes if module_path(n) == prefix or module_path(n).startswith(prefix + ".")
            or n.meta.get("graftfx_replaces", "").startswith(prefix + ".")]


def _label(node: fx.Node, gm) -> tuple[str, str]:
    kind = op_kind(node, gm) if gm is not None else node.op
    if "graftfx_replaces" in node.meta:
        op = type(gm.get_submodule(node.target)).__name__ if gm is not None else "graft"
        return f"{node.target}\n{op} (grafted)", "graft"
    shape = node_shape(node)
    text = f"{node.name}\n{kind}" + (f" {list(shape)}" if shape else "")
    return text, kind


def to_dot(nodes: list[fx.Node], gm=None, title: str = "") -> str:
    inside = set(nodes)
    lines = ["digraph G {", '  rankdir=TB; node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             f'  label="{title}"; labelloc=t; fontname="Helvetica";']
    external: dict[fx.Node, str] = {}
    for n in nodes:
        text, kind = _label(n, gm)
        lines.append(f'  "{n.name}" [label="{_esc(text)}", fillcolor="{_COLOURS.get(kind, "#f8f9fa")}"];')
        for a in _inputs(n):
            if a not in inside and a.op not in ("get_attr",):
                external.setdefault(a, f"in_{a.name}")
            src = a.name if a in inside else external.get(a)
            if src:
                lines.append(f'  "{src}" -> "{n.name}";')
    for a, name in external.items():
        lines.append(f'  "{name}" [label="{_esc(a.name)}", fillcolor="{_COLOURS["input"]}", style="dashed,filled"];')
    lines.append("}")
    return "\n".join(lines)


def _inputs(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_svg(nodes: list[fx.Node], gm=None, title: str = "") -> tuple[str, str]:
    """(svg text, renderer name): ``dot`` when it runs, else the built-in layout."""
    dot = shutil.which("dot")
    if dot:
        try:
            res = subprocess.run([dot, "-Tsvg"], input=to_dot(nodes, gm, title), capture_output=True, text=True, timeout=60)
            if res.returncode == 0 and "<svg" in res.stdout:
                return res.stdout[res.stdout.index("<svg"):], "graphviz"
        except (OSError, subprocess.SubprocessError):
            pass
    return builtin_svg(nodes, gm, title), "builtin"


def builtin_svg(nodes: list[fx.Node], gm=None, title: str = "") -> str:
    """A plain top-to-bottom layered drawing: each node one rank below its deepest input."""
    inside = set(nodes)
    rank: dict[fx.Node, int] = {}
    for n in nodes:  # graph order is topological
        rank[n] = 1 + max((rank[a] for a in _inputs(n) if a in inside), default=-1)
    rows: dict[int, list[fx.Node]] = {}
    for n in nodes:
        rows.setdefault(rank[n], []).append(n)
    box_w, box_h, gap_x, gap_y, top = 170, 34, 20, 26, 30
    width = max((len(r) for r in rows.values()), default=1) * (box_w + gap_x) + gap_x
    height = top + len(rows) * (box_h + gap_y) + gap_y
    pos: dict[fx.Node, tuple[float, float]] = {}
    for r, row in rows.items():
        offset = (width - len(row) * (box_w + gap_x) + gap_x) / 2
        for i, n in enumerate(row):
            pos[n] = (offset + i * (box_w + gap_x), top + r * (box_h + gap_y))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'font-family="Helvetica, Arial, sans-serif" font-size="10">',
             f'<text x="8" y="18" font-size="12" font-weight="bold">{html.escape(title)}</text>']
    for n in nodes:
        x, y = pos[n]
        for a in _inputs(n):
            if a in pos:
                ax, ay = pos[a]
                parts.append(f'<line x1="{ax + box_w / 2:.0f}" y1="{ay + box_h:.0f}" x2="{x + box_w / 2:.0f}" '
                             f'y2="{y:.0f}" stroke="#868e96" stroke-width="1"/>')
    for n in nodes:
        x, y = pos[n]
        text, kind = _label(n, gm)
        first, _, second = text.partition("\n")
        parts.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="6" '
                     f'fill="{_COLOURS.get(kind, "#f8f9fa")}" stroke="#495057"/>')
        parts.append(f'<text x="{x + 6:.0f}" y="{y + 14:.0f}">{html.escape(first[:30])}</text>')
        parts.append(f'<text x="{x + 6:.0f}" y="{y + 27:.0f}" fill="#495057">{html.escape(second[:30])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
