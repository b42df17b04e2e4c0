"""The demo end to end on the bundled model, with tiny settings (the full one runs in make demo)."""
import torch

from graftfx.demo import DemoSettings, run_demo


def test_demo_writes_report_with_tables_grid_and_curves(tmp_path, monkeypatch):
    traces = []
    real = torch.fx.symbolic_trace
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda *a, **k: traces.append(a) or real(*a, **k))
    s = DemoSettings(samples=16, steps1=3, steps2=2, batch2=4, eval_per_class=1, eval_steps="ddim2")
    res = run_demo(tmp_path, s, progress=False)
    assert len(traces) == 1, "the demo traces the model once: inspect, graft and distill share it"
    assert [r["model"] for r in res["rows"]] == ["teacher", "grafted, before distillation", "grafted, after distillation"]
    md = (tmp_path / "report.md").read_text()
    assert "| teacher |" in md and "samples.png" in md and "stage1-loss.png" in md and "| total |" in md
    for f in ("report.html", "samples.png", "distill/stage1/stage1-loss.png", "distill/stage2/stage2-loss.png",
              "distill/grafted/graft.json", "inspect/report.html"):
        assert (tmp_path / f).exists(), f
    assert set(res["timings"]) >= {"load + trace + match", "evaluate", "total"}
