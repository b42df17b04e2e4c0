import json
import os

import pytest
import torch

import graftfx
from graftfx import GraftError
from graftfx.distill import ActivationCache, CacheSpec, CalibrationSet, OnlineTeacher, Tap, record, write_cache
from graftfx.distill.cache import Shard, write_shard


def _setup(model, rules, digits, samples=24):
    traced = graftfx.trace(model, model.example_inputs(2))
    plan = graftfx.select(traced, rules)
    taps = [Tap.of(r) for _, r in plan.selected]
    calib = CalibrationSet(*digits, samples=samples, seed=3)
    return traced, taps, calib


def _spec(dtype="float32", samples=24, model_hash="m1", data_hash="d1"):
    return CacheSpec(samples=samples, shard_size=10, dtype=dtype, seed=3, model_hash=model_hash, data_hash=data_hash)


def test_cache_holds_exactly_what_the_teacher_computed(tmp_path, digits_dit, rules, digits):
    traced, taps, calib = _setup(digits_dit, rules, digits)
    write_cache(tmp_path, traced, taps, calib, _spec(), batch_size=7, progress=False, log=lambda *a: None)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["complete"] and index["samples"] == 24 and (index["model_hash"], index["data_hash"]) == ("m1", "d1")
    assert set(index["regions"]) == {"blocks.1.attn", "blocks.3.attn", "blocks.1.mlp", "blocks.3.mlp"}
    assert index["regions"]["blocks.1.attn"]["fields"] == {"input": [16, 32], "output": [16, 32]}
    assert index["regions"]["blocks.1.attn"]["tap"] == {"input": taps[0].input, "output": taps[0].output, "context": None}
    assert [s["count"] for s in index["shards"]["blocks.1.attn"]] == [10, 10, 4]
    cache = ActivationCache(tmp_path, taps=taps, model_hash="m1", data_hash="d1", seed=3, samples=24)
    idx = [23, 0, 11, 5, 11]
    got = cache.batch(idx)
    want = record(traced, taps, calib.batch(idx))
    for path in want:  # recorded in other batch groupings: equal up to float rounding
        for field in ("input", "output"):
            torch.testing.assert_close(got[path][field].float(), want[path][field], rtol=1e-5, atol=1e-6, msg=f"{path} {field}")


def test_online_teacher_feeds_the_same_batches_as_the_cache(tmp_path, digits_dit, rules, digits):
    traced, taps, calib = _setup(digits_dit, rules, digits)
    write_cache(tmp_path, traced, taps, calib, _spec("float16"), progress=False, log=lambda *a: None)
    cached = ActivationCache(tmp_path).batch([4, 19, 2])
    online = OnlineTeacher(traced, taps, calib, "float16").batch([4, 19, 2])
    for path in cached:  # same samples; values agree to the float16 storage precision
        for field in cached[path]:
            assert cached[path][field].dtype == online[path][field].dtype == torch.float16
            torch.testing.assert_close(cached[path][field].float(), online[path][field].float(), rtol=2e-3, atol=2e-3)


def test_interrupted_write_resumes_without_rewriting_done_shards(tmp_path, digits_dit, rules, digits):
    traced, taps, calib = _setup(digits_dit, rules, digits)
    calls = {"n": 0}
    real = calib.batch

    def flaky(indices):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("power cut")
        return real(indices)

    calib.batch = flaky
    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path, traced, taps, calib, _spec(), batch_size=10, progress=False, log=lambda *a: None)
    index = json.loads((tmp_path / "index.json").read_text())
    assert not index["complete"] and [s["index"] for s in index["shards"]["blocks.1.attn"]] == [0, 1]
    assert not list(tmp_path.rglob(".*tmp*")), "a half-written shard was left behind"
    with pytest.raises(GraftError, match="incomplete; rerun the same command"):
        ActivationCache(tmp_path)
    first = tmp_path / index["shards"]["blocks.1.attn"][0]["file"]
    stamp = first.stat().st_mtime_ns
    calib.batch = real
    write_cache(tmp_path, traced, taps, calib, _spec(), batch_size=10, progress=False, log=lambda *a: None)
    assert first.stat().st_mtime_ns == stamp
    assert ActivationCache(tmp_path).batch([23])["blocks.3.mlp"]["output"].shape == (1, 16, 32)


def test_corrupted_or_mismatched_shard_is_reported_by_name(tmp_path, digits_dit, rules, digits):
    traced, taps, calib = _setup(digits_dit, rules, digits)
    write_cache(tmp_path, traced, taps, calib, _spec(), progress=False, log=lambda *a: None)
    index = json.loads((tmp_path / "index.json").read_text())
    shard = tmp_path / index["shards"]["blocks.3.attn"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    cache = ActivationCache(tmp_path)
    cache.batch([0, 1], paths=["blocks.3.attn"])  # shard 0 is fine
    with pytest.raises(GraftError, match=f"cache shard {shard} is corrupted"):
        cache.batch([12], paths=["blocks.3.attn"])
    with pytest.raises(GraftError, match="written with another model_hash"):
        write_cache(tmp_path, traced, taps, calib, _spec(model_hash="m9"), progress=False, log=lambda *a: None)


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(model_hash="m2"), "recorded with model_hash 'm1' but this run has 'm2'", id="teacher"),
    pytest.param(dict(data_hash="d2"), "recorded with data_hash 'd1' but this run has 'd2'", id="data"),
    pytest.param(dict(seed=4), "recorded with seed 3 but this run has 4", id="seed"),
    pytest.param(dict(samples=25), "recorded with samples 24 but this run has 25", id="samples"),
])
def test_a_reader_with_other_settings_is_refused(tmp_path, digits_dit, rules, digits, kwargs, message):
    traced, taps, calib = _setup(digits_dit, rules, digits)
    write_cache(tmp_path, traced, taps, calib, _spec(), progress=False, log=lambda *a: None)
    ActivationCache(tmp_path, taps=taps, model_hash="m1", data_hash="d1", seed=3, samples=24)  # the same: fine
    with pytest.raises(GraftError, match=message):
        ActivationCache(tmp_path, **kwargs)


def test_a_cache_feeds_any_subset_of_its_regions_read_at_the_same_nodes(tmp_path, digits_dit, rules, digits):
    traced, taps, calib = _setup(digits_dit, rules, digits)
    write_cache(tmp_path, traced, taps, calib, _spec(), progress=False, log=lambda *a: None)
    some = ActivationCache(tmp_path, taps=taps[1:2])
    assert some.paths == [taps[1].path] and set(some.batch([0])) == {taps[1].path}
    with pytest.raises(GraftError, match="holds no region blocks.0.attn"):
        ActivationCache(tmp_path, taps=[Tap("blocks.0.attn", taps[0].input, taps[0].output)])
    with pytest.raises(GraftError, match="recorded blocks.1.attn at other graph nodes"):
        ActivationCache(tmp_path, taps=[Tap(taps[0].path, taps[0].input, "some_other_node")])


def test_a_damaged_index_is_a_clear_error(tmp_path, digits_dit, rules, digits):
    traced, taps, calib = _setup(digits_dit, rules, digits)
    write_cache(tmp_path, traced, taps, calib, _spec(), progress=False, log=lambda *a: None)
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"]["blocks.1.attn"][0]["file"] = "../../etc/passwd"
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(GraftError, match="names a shard outside the cache folder"):
        ActivationCache(tmp_path).batch([0], paths=["blocks.1.attn"])
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(GraftError, match="is not valid JSON"):
        ActivationCache(tmp_path)


def test_refuses_when_the_disk_lacks_room(tmp_path, digits_dit, rules, digits, monkeypatch):
    import shutil
    from collections import namedtuple

    traced, taps, calib = _setup(digits_dit, rules, digits)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    lines = []  # 4 regions x 24 samples x (16 x 32) x {input, output} x 4 bytes = 393,216 bytes
    with pytest.raises(GraftError, match=r"cache needs 393.22 kB more but .* has 1.00 kB free; use fewer --samples"):
        write_cache(tmp_path, traced, taps, calib, _spec(), progress=False, log=lines.append)
    assert "4 regions x 24 samples (float32)" in lines[0]
    assert not list(tmp_path.glob("r*/shard-*"))


def test_shard_reads_rows_memory_mapped(tmp_path, monkeypatch):
    t = torch.randn(50, 3, 4).to(torch.bfloat16)
    sha = write_shard(tmp_path / "s.safetensors", {"x": t, "y": t.float()})
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "s.safetensors"))["x"], t)  # a valid safetensors file
    shard = Shard(tmp_path / "s.safetensors")
    import numpy as np

    maps = []
    real = np.memmap

    def spy(*args, **kwargs):  # rows come out of a memory map of just that tensor, never a full read
        maps.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "memmap", spy)
    rows = shard.rows("x", np.array([7, 2, 49]))
    assert torch.equal(rows, t[[7, 2, 49]]) and rows.dtype == torch.bfloat16
    assert [m["shape"] for m in maps] == [(50, 3, 4)] and maps[0]["offset"] == shard.base and maps[0]["mode"] == "r"
    assert len(sha) == 64
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_the_cli_cache_is_keyed_on_the_teachers_weights_seed_and_regions_not_its_name(tmp_path, capsys):
    """The issue: the CLI gave the model's name as the cache key, so a retrained checkpoint at the
    same path reused the old cache. Now the same path with other weights, another seed or other
    rules (regions) is refused on read, in one line naming the cache and what differs."""
    from safetensors.torch import save_file

    from graftfx.cli import main
    from graftfx.models import load_bundled_digits_dit

    sd = load_bundled_digits_dit().state_dict()
    ckpt, cache = tmp_path / "teacher.safetensors", tmp_path / "cache"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
    every = tmp_path / "every.toml"
    every.write_text('version = 1\n[[rule]]\npattern = "self_attention"\noperator = "hyena_x"\n')

    def distill(rules="digits-mha-hyena_x-50p.toml", *extra):
        argv = ["distill", str(rules), "--model", str(ckpt), "--out", str(tmp_path / f"out{len(runs)}"),
                "--cache", str(cache), "--samples", "8", "--shard-size", "4", "--stage", "1", "--steps1", "1",
                "--batch1", "4", "--no-progress", "--device", "cpu", *extra]
        runs.append(argv)
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err.strip()

    runs: list = []
    assert distill()[0] == 0
    assert distill()[0] == 0                               # the same teacher, seed and rules: reused
    code, err = distill("digits-mha-hyena_x-50p.toml", "--seed", "1")
    assert code == 2 and err.count("\n") == 0 and f"cache {cache} was written with another seed" in err, err
    code, err = distill(every)
    assert code == 2 and err.count("\n") == 0 and "written with other regions" in err, err
    save_file({k: (v + 0.01 * (i % 3 == 0)).contiguous() for i, (k, v) in enumerate(sd.items())}, str(ckpt))  # retrained
    code, err = distill()
    assert code == 2 and err.count("\n") == 0 and f"cache {cache} was written with another model_hash" in err, err
