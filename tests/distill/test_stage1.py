import json

import pytest
import torch

import graftfx
from graftfx import GraftError
from graftfx.distill import (ActivationCache, CacheSpec, CalibrationSet, RegionJob, Stage1Config, Tap, train_stage1,
                             write_cache)


def _jobs(grafted):
    return [RegionJob(g.region.path, g.target, grafted.get_submodule(g.target), g.rule.effective_loss, g.region.kind)
            for g in grafted.grafts]


@pytest.fixture
def setup(tmp_path, digits_dit, rules, digits):
    traced = graftfx.trace(digits_dit, digits_dit.example_inputs(2))
    plan = graftfx.select(traced, rules)
    taps = [Tap.of(r) for _, r in plan.selected]
    calib = CalibrationSet(*digits, samples=40, seed=0)
    write_cache(tmp_path / "cache", traced, taps, calib, CacheSpec(40, 20, "float16", 0, "r", "m"),
                progress=False, log=lambda *a: None)
    return traced, plan, ActivationCache(tmp_path / "cache")


def test_only_spliced_operators_train_and_losses_drop(tmp_path, setup, digits_dit):
    traced, plan, cache = setup
    grafted = graftfx.splice(plan)
    before = {k: v.clone() for k, v in digits_dit.state_dict().items()}
    jobs = _jobs(grafted)
    assert [j.loss for j in jobs] == ["l1", "l1", "l2", "l2"]  # L1 for attention, L2 for MLPs
    cfg = Stage1Config(steps=40, batch_size=8, log_every=5, ckpt_every=20)
    res = train_stage1(jobs, cache, cfg, tmp_path / "s1", progress=False)
    for k, v in digits_dit.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher weight {k} changed"
    rows = [json.loads(line) for line in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    for path in res["losses"]:
        first, last = rows[0][f"loss/{path}"], rows[-1][f"loss/{path}"]
        assert last < first, (path, first, last)
    assert (tmp_path / "s1" / "stage1-loss.png").stat().st_size > 1000


def test_resume_continues_bit_for_bit(tmp_path, setup):
    traced, plan, cache = setup
    cfg = Stage1Config(steps=12, batch_size=4, log_every=2, ckpt_every=6, seed=5)
    torch.manual_seed(0)
    full = graftfx.splice(plan)
    train_stage1(_jobs(full), cache, cfg, tmp_path / "a", progress=False)
    torch.manual_seed(0)
    part = graftfx.splice(plan)
    train_stage1(_jobs(part), cache, Stage1Config(**{**cfg.__dict__, "steps": 6}), tmp_path / "b", progress=False)
    torch.manual_seed(0)
    resumed = graftfx.splice(plan)  # fresh modules: everything must come from the checkpoint
    train_stage1(_jobs(resumed), cache, cfg, tmp_path / "b", resume=True, progress=False)
    for (ka, va), (kb, vb) in zip(sorted(full.spliced_named_parameters()), sorted(resumed.spliced_named_parameters())):
        assert ka == kb and torch.equal(va, vb), ka
    a = (tmp_path / "a" / "metrics.jsonl").read_text()
    b = (tmp_path / "b" / "metrics.jsonl").read_text()
    assert a == b


def test_nan_loss_names_region_and_step_and_keeps_checkpoint(tmp_path, setup):
    traced, plan, cache = setup
    grafted = graftfx.splice(plan)
    jobs = _jobs(grafted)
    res = train_stage1(jobs, cache, Stage1Config(steps=4, batch_size=4, ckpt_every=2), tmp_path / "s", progress=False)
    folder = tmp_path / "s" / "checkpoint" / "step-0000004"
    assert res["checkpoint"] == str(folder)
    good = (folder / "params.safetensors").read_bytes()
    jobs[2].module.register_forward_hook(lambda m, i, out: out * float("nan"))  # blows up from now on
    with pytest.raises(GraftError, match=r"stage 1 diverged in step 5: loss/blocks.1.mlp = nan; the last good "
                                         r"checkpoint \(step 4\) is kept in .*step-0000004; fix: lower the stage 1 lr"):
        train_stage1(jobs, cache, Stage1Config(steps=8, batch_size=4, ckpt_every=1), tmp_path / "s", resume=True,
                     progress=False)
    assert (folder / "params.safetensors").read_bytes() == good
    assert sorted(p.name for p in (tmp_path / "s" / "checkpoint").iterdir()) == ["latest.json", "step-0000002",
                                                                                  "step-0000004"]


def test_resume_without_a_checkpoint_is_an_error_and_a_fresh_run_starts_clean(tmp_path, setup):
    traced, plan, cache = setup
    cfg = Stage1Config(steps=4, batch_size=4, ckpt_every=2, log_every=1)
    with pytest.raises(GraftError, match=r"--resume: no complete checkpoint in .*s1.checkpoint; fix: run without "
                                         r"--resume to start, or pass the --out of an earlier run"):
        train_stage1(_jobs(graftfx.splice(plan)), cache, cfg, tmp_path / "s1", resume=True, progress=False)
    assert not (tmp_path / "s1" / "metrics.jsonl").exists()  # nothing started, nothing appended
    train_stage1(_jobs(graftfx.splice(plan)), cache, Stage1Config(**{**cfg.__dict__, "steps": 6}), tmp_path / "s1",
                 progress=False)
    # a fresh run in the same folder: the 6-step run's checkpoints and metrics are gone, not resumed or appended to
    res = train_stage1(_jobs(graftfx.splice(plan)), cache, cfg, tmp_path / "s1", progress=False)
    root = tmp_path / "s1" / "checkpoint"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-0000002", "step-0000004"]
    assert res["checkpoint"] == str(root / "step-0000004")
    rows = [json.loads(line) for line in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
