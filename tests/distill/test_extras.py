"""Stage 1 on regions that carry more than an input: a key-padding mask (PixArt's captions), rotary
tables the same for every sample (HunyuanDiT), a second output (SD3's joint attention).

The check that matters: a copy-initialised ``mha`` graft, fed the cached teacher fields the way
stage 1 feeds them (``job_inputs``), reproduces the cached teacher outputs; without the extras it
does not. Then a fresh graft on the masked region trains (its loss falls).
"""
from __future__ import annotations

import pytest
import torch

import graftfx
from graftfx.distill import ActivationCache, CacheSpec, OnlineTeacher, Tap, write_cache
from graftfx.distill.stage1 import RegionJob, job_inputs
from graftfx.models.zoo import small_diffusers, small_diffusers_inputs

RULE = """version = 1
[[rule]]
name = "r"
pattern = "{pattern}"
operator = "mha"
select = {{ preset = "all" }}
options = {{ init = "{init}" }}
"""


class Inputs:
    """Calibration samples from the zoo's example inputs: sample i is row i of a batch of ``n``."""

    def __init__(self, kind: str, n: int):
        self.kind, self.samples = kind, n
        self.kwargs = small_diffusers_inputs(kind, n)
        if kind == "pixart":      # padded captions, so the mask matters
            mask = torch.ones(n, 6, dtype=torch.long)
            mask[::2, 3:] = 0
            self.kwargs["encoder_attention_mask"] = mask

    def call(self, indices):
        idx = torch.as_tensor(list(indices))
        rows = {k: v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == self.samples else v
                for k, v in self.kwargs.items()}
        return (), rows


_TRACES: dict[str, object] = {}   # one trace per model for the whole module (export takes seconds)


def _grafted_cache(tmp_path, kind: str, pattern: str, init: str = "copy", samples: int = 6):
    data = Inputs(kind, samples)
    if kind not in _TRACES:
        _TRACES[kind] = graftfx.trace(small_diffusers(kind), (), data.call(range(2))[1])
    rules = tmp_path / "r.toml"
    rules.write_text(RULE.format(pattern=pattern, init=init))
    plan = graftfx.select(_TRACES[kind], graftfx.load_rules(rules))
    grafted = graftfx.splice(plan)
    taps = [Tap.of(g.region) for g in grafted.grafts]
    spec = CacheSpec(samples=samples, shard_size=4, dtype="float32", seed=0, model_hash="m", data_hash="d")
    write_cache(tmp_path / "cache", plan.traced, taps, data, spec, batch_size=3, progress=False, log=lambda *a: None)
    jobs = [RegionJob(g.region.path, g.target, grafted.get_submodule(g.target), "l1", g.region.kind)
            for g in grafted.grafts]
    return plan, data, taps, jobs, ActivationCache(tmp_path / "cache", taps=taps)


def _errors(job, fields, drop_extras=False):
    args, kwargs, targets = job_inputs(job, fields, "cpu")
    with torch.no_grad():
        out = job.module(*args, **({} if drop_extras else kwargs))
    outs = out if isinstance(out, tuple) else (out,)
    return [float((o - t).abs().max() / t.abs().max()) for o, t in zip(outs, targets)]


@pytest.mark.parametrize("kind, pattern, field, batched", [
    pytest.param("pixart", "cross_attention", "in:mask", True, id="pixart-mask"),
    pytest.param("hunyuan", "self_attention", "in:q_cos", False, id="hunyuan-rope"),
    pytest.param("sd3", "joint_attention", "out:context", True, id="sd3-joint"),
])
def test_copy_graft_reproduces_cached_teacher_with_its_extras(tmp_path, kind, pattern, field, batched):
    plan, data, taps, jobs, cache = _grafted_cache(tmp_path, kind, pattern)
    assert jobs
    batch = cache.batch([5, 0, 3])
    index = cache.index
    checked = 0
    for tap, job in zip(taps, jobs):
        fields = batch[tap.path]
        if field.startswith("out:") and not tap.extra_outputs:
            assert field not in fields      # SD3's last block returns no text stream
            continue
        checked += 1
        assert field in fields, f"{tap.path}: cache holds {sorted(fields)}"
        in_shards = field in index["regions"][tap.path]["fields"]
        assert in_shards == batched                  # per-sample in the shards, constants once
        assert (tap.path in index.get("constants", {})) == (not batched and field.startswith("in:"))
        assert max(_errors(job, fields)) < 1e-5, tap.path
    assert checked
    if field.startswith("in:"):                       # the extras are what makes the copy exact
        assert max(_errors(jobs[0], batch[taps[0].path], drop_extras=True)) > 1e-3
    online = OnlineTeacher(plan.traced, taps, data, "float32").batch([5, 0, 3])
    for tap in taps:
        for name, value in batch[tap.path].items():
            torch.testing.assert_close(online[tap.path][name], value, rtol=1e-5, atol=1e-6, msg=f"{tap.path} {name}")


def test_fresh_graft_on_masked_cross_attention_trains(tmp_path):
    from graftfx.distill import Stage1Config, train_stage1

    _, _, _, jobs, cache = _grafted_cache(tmp_path, "pixart", "cross_attention", init="fresh", samples=8)
    before = [max(_errors(j, cache.batch(range(8))[j.path])) for j in jobs]
    cfg = Stage1Config(steps=40, batch_size=4, lr=3e-3, log_every=40, ckpt_every=40)
    train_stage1(jobs, cache, cfg, tmp_path / "stage1", progress=False)
    after = [max(_errors(j, cache.batch(range(8))[j.path])) for j in jobs]
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)
