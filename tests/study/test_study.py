import json

import pytest

from graftfx import GraftError
from graftfx.study import load_study, run_study

TINY = """version = 1
description = "tiny"
model = "digits"
data = "digits"
fractions = ["paper-50"]
[settings]
samples = 16
steps1 = 3
batch1 = 4
steps2 = 2
batch2 = 4
eval_per_class = 2
eval_steps = "ddim2"
latency_batch = 2
[[experiment]]
name = "MHA -> Hyena-X"
pattern = "self_attention"
operator = "hyena_x"
paper = { "50%" = 2.74 }
[[experiment]]
name = "MLP -> MLP r=3"
pattern = "mlp"
operator = "mlp"
options = { ratio = 3 }
fractions = ["all"]
"""


def test_bundled_paper_table_study_is_valid():
    study = load_study("paper-table.toml")
    names = [e.name for e in study.experiments]
    assert {"MHA -> Hyena-SE", "MHA -> Hyena-X", "MHA -> Hyena-Y", "MHA -> SWA (w=4)", "MHA -> Mamba-2",
            "MHA -> linear attention", "MHA self-graft", "MLP -> MLP r=3", "MLP -> MLP r=6",
            "MLP -> MLP Hyena-X (r=2)", "MLP self-graft"} <= set(names)
    assert len(study.runs()) == 11 * 3 + 2


def test_study_file_errors(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(TINY.replace('operator = "hyena_x"', 'operator = "hyena_z"'))
    with pytest.raises(GraftError, match="unknown operator 'hyena_z'"):
        load_study(p)
    p.write_text(TINY.replace("steps1 = 3", "stepz = 3"))
    with pytest.raises(GraftError, match="unknown settings key 'stepz'"):
        load_study(p)


def test_tiny_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    import torch

    import graftfx.distill as distill

    p = tmp_path / "s.toml"
    p.write_text(TINY)
    study = load_study(p)
    out = tmp_path / "out"
    traces, runs = [], []
    real_trace, real_distill = torch.fx.symbolic_trace, distill.distill_plan
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda *a, **k: traces.append(a) or real_trace(*a, **k))
    monkeypatch.setattr(distill, "distill_plan", lambda plan, *a, **k: runs.append(plan) or real_distill(plan, *a, **k))
    res = run_study(study, out, progress=False, log=lambda *a: None)
    # the study runs the distillation pipeline (one plan per run) on one trace of the teacher
    assert len(traces) == 1 and len(runs) == 2 and all(plan.traced is runs[0].traced for plan in runs)
    assert set(res["runs"]) == {"MHA -> Hyena-X @ 50%", "MLP -> MLP r=3 @ 100%"}
    run = res["runs"]["MHA -> Hyena-X @ 50%"]
    assert run["regions"] == ["blocks.1.attn", "blocks.3.attn", "blocks.5.attn", "blocks.7.attn"]
    assert run["loss"] == "l1" and res["runs"]["MLP -> MLP r=3 @ 100%"]["loss"] == "l2"
    assert run["fid"] > 0 and 0 <= run["accuracy"] <= 1 and run["eval"]["steps"] == "ddim2"
    assert res["runs"]["MLP -> MLP r=3 @ 100%"]["params"] < res["teacher"]["params"]
    table = (out / "table.md").read_text()
    assert "| MHA -> Hyena-X | " in table and "| 2.74 |" in table
    assert (out / "quality-vs-latency.png").stat().st_size > 1000
    stamp = json.loads((out / "results.json").read_text())
    again = run_study(study, out, progress=False, log=lambda *a: None)  # resumes: nothing left to train

    def without_latency(runs):
        return {k: {f: v for f, v in r.items() if f != "latency_ms"} for k, r in runs.items()}

    assert without_latency(stamp["runs"]) == without_latency(again["runs"])
    assert all(r["latency_ms"] > 0 for r in again["runs"].values())  # re-timed in one interleaved pass
