import json

import graftfx
from graftfx import Rule, Select
from graftfx.inspect.render import builtin_svg, to_dot


def _rules():
    return [Rule("self_attention", "mha", Select(preset="paper-50"), {"init": "fresh"}),
            Rule("mlp", "mlp", Select(indices=[0]), {"ratio": 6})]


def test_inspect_table_totals_and_diff(tiny_dit, tmp_path):
    report = graftfx.inspect(tiny_dit, _rules(), tiny_dit.example_inputs(2), name="tiny")
    rows = {r.path: r for r in report.rows}
    assert set(rows) >= {"blocks.0.attn", "blocks.3.attn", "blocks.0.mlp"}
    assert "t_embedder.mlp" not in rows          # a (B, D) timestep MLP is not a token MLP region
    assert rows["blocks.1.attn"].selected and not rows["blocks.0.attn"].selected
    assert rows["blocks.0.mlp"].operator == "mlp" and rows["blocks.0.mlp"].params_after == 64 * 384 + 384 + 384 * 64 + 64
    t = report.totals
    assert t["params_after"] - t["params_before"] == rows["blocks.0.mlp"].params_after - rows["blocks.0.mlp"].params
    # 6x MLP: hidden 384 instead of 256, FLOPs scale the same way
    assert t["flops_after"] - t["flops_before"] == rows["blocks.0.mlp"].flops // 2
    removed = [line for line in report.diff.splitlines() if line.startswith("-")]
    added = [line for line in report.diff.splitlines() if line.startswith("+")]
    assert any("blocks_1_attn_qkv = " in line for line in removed)
    assert any("blocks_1_attn = " in line for line in added) and not any("qkv" in line for line in added)
    text = report.text()
    assert "rule self_attention->mha: matched 4, selected 2, skipped 2" in text
    assert "blocks.1.attn" in report.table()


def test_inspect_writes_self_contained_report(tiny_dit, tmp_path):
    report = graftfx.inspect(tiny_dit, _rules(), tiny_dit.example_inputs(2), name="tiny")
    files = report.write(tmp_path)
    assert set(files) >= {"report.html", "regions.json", "report.txt", "graph.diff", "before.svg", "after.svg"}
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") == 2 and "<script src" not in html and "blocks.1" in html
    data = json.loads((tmp_path / "regions.json").read_text())
    assert data["block"] == "blocks.1" and len(data["regions"]) == len(report.rows)
    after = (tmp_path / "after.svg").read_text()
    assert "grafted" in after and "qkv" not in after  # the block's attention is one node now
    assert "qkv" in (tmp_path / "before.svg").read_text()
    assert not list(tmp_path.glob(".*.tmp*"))


def test_builtin_svg_and_dot_text(tiny_dit):
    traced = graftfx.trace(tiny_dit, tiny_dit.example_inputs(2))
    nodes = [n for n in traced.graph.nodes if n.meta.get("graftfx_path", "").startswith("blocks.0.attn")]
    svg = builtin_svg(nodes, traced.gm, "blocks.0.attn")
    assert svg.startswith("<svg") and svg.count("<rect") == len(nodes)
    dot = to_dot(nodes, traced.gm)
    assert dot.startswith("digraph") and '"blocks_0_attn_qkv" [label=' in dot


def test_explain_names_nearest_candidates_and_failed_condition(tiny_dit):
    out = graftfx.explain(tiny_dit, [Rule("cross_attention", "mha"), Rule("self_attention", "mha", Select(preset="paper-50"))],
                          tiny_dit.example_inputs(2))
    cross, selfa = out
    assert cross.matched == [] and cross.blocks == 4
    text = str(cross)
    assert "nothing matched; the model contains: self_attention x4, mlp x4" in text  # t_embedder: (B, D), not a token MLP
    assert "blocks.0.attn: attention found, but it is self_attention, not cross_attention" in text
    assert selfa.selected == ["blocks.1.attn", "blocks.3.attn"] and selfa.missing_blocks == []
