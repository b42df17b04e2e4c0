"""graftfx bench on the CPU at tiny shapes: the timer, the cost and crossover arithmetic, the
reference paths, and the command end to end. Timings are never asserted, only their sanity."""
import json
import math

import pytest
import torch

import graftfx
from graftfx.bench.cases import (CPU_DIM_DIV, CPU_TOKENS_DIV, PRESETS, REFERENCES, OpCase, Shape,
                                 build, make_region, operator_cases, paths_for, resolve_shapes)
from graftfx.bench.crossover import CPU_SWEEP, crossover_point, sweep_lengths
from graftfx.bench.harness import measure_ceilings, time_callable
from graftfx.bench.report import GPU_NOTE
from graftfx.bench.runner import TimerSettings, bytes_moved, time_module
from graftfx.cli import main
from graftfx.errors import GraftError
from graftfx.registry import operators

CPU = torch.device("cpu")
FAST = ["--rep-ms", "2", "--warmup-ms", "0"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Two intra-op threads on a shared 2-core machine stall on each other; one is steadier.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(capsys, *argv):
    code = main(["bench", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _results(path):
    data = json.loads(path.read_text())
    return data, data["results"]


# ----------------------------------------------------------------------------- harness
def test_time_callable_times_a_callable_and_resets_grads():
    w = torch.ones(8, requires_grad=True)
    calls = []

    def step():
        calls.append(1)
        (2 * w).sum().backward()

    t = time_callable(step, CPU, warmup_ms=0, rep_ms=5, grad_to_none=[w])
    assert t.reps >= 3 and len(calls) >= t.reps + 1        # a warm-up call, then the timed ones
    assert math.isfinite(t.ms) and 0 < t.ms_min <= t.ms
    assert torch.equal(w.grad, torch.full((8,), 2.0))      # cleared before each call: no accumulation
    with pytest.raises(TypeError):
        time_callable(42, CPU)


def test_measured_ceilings_are_positive():
    c = measure_ceilings(CPU, torch.float32, warmup_ms=0, rep_ms=5)
    assert math.isfinite(c.gbps) and c.gbps > 0
    assert math.isfinite(c.tflops) and c.tflops > 0
    assert c.dtype == "fp32" and c.matmul_n > 0 and c.copy_bytes > 0


def test_bytes_model():
    x, y, w = 2 * 3 * 4 * 2, 2 * 3 * 5 * 2, 7 * 2     # batch 2, tokens 3, d_in 4, d_out 5, 7 params, bf16
    assert bytes_moved(2, 3, 4, 5, 7, 2, "fwd") == x + w + y
    assert bytes_moved(2, 3, 4, 5, 7, 2, "fwd+bwd") == 3 * x + 3 * w + 2 * y
    with pytest.raises(ValueError):
        bytes_moved(2, 3, 4, 5, 7, 2, "bwd")


# ----------------------------------------------------------------------------- crossover arithmetic
def test_crossover_point():
    mid = crossover_point([(256, 0.5), (512, 0.8), (1024, 1.25), (2048, 2.0)])
    assert mid["tokens"] == 1024
    assert mid["estimate"] == pytest.approx(2 ** 9.5)      # log-log: 0.8 -> 1.25 is symmetric about 1
    assert crossover_point([(256, 1.5), (512, 3.0)])["tokens"] == 256
    never = crossover_point([(256, 0.5), (512, 0.9)])
    assert never["tokens"] is None and "512" in never["text"]
    # a dip: only the trailing run of faster points counts; unmeasured points are ignored
    assert crossover_point([(256, 1.2), (512, 0.9), (1024, None), (2048, 1.1)])["tokens"] == 2048
    assert crossover_point([(256, None)])["tokens"] is None


def test_sweep_lengths():
    assert sweep_lengths(16, 64) == [16, 32, 64]
    assert sweep_lengths(*CPU_SWEEP)[-1] == CPU_SWEEP[1]
    for lo, hi in ((48, 64), (64, 16), (0, 16)):
        with pytest.raises(GraftError):
            sweep_lengths(lo, hi)


# ----------------------------------------------------------------------------- shapes and cases
def test_shapes_scale_down_on_cpu_and_take_overrides():
    (s,), notes = resolve_shapes(None, CPU)
    p = PRESETS["dit-xl2"]
    assert (s.batch, s.tokens, s.dim, s.heads, s.dtype) == (
        1, p.tokens // CPU_TOKENS_DIV, p.dim // CPU_DIM_DIV, p.heads // CPU_DIM_DIV, "fp32")
    assert any("pass --full" in n for n in notes)
    (full,), _ = resolve_shapes(["dit-xl2"], CPU, full=True)
    assert full == p
    (odd,), notes = resolve_shapes(["pixart-1024"], CPU, dim=30, tokens=64, dtype="bf16")
    assert odd.dim == 30 and odd.tokens == 64 and odd.dtype == "bf16" and 30 % odd.heads == 0
    assert any("do not divide" in n for n in notes)
    with pytest.raises(GraftError, match="--heads 7"):
        resolve_shapes(None, CPU, dim=32, heads=7)
    with pytest.raises(GraftError, match="--dtype"):
        resolve_shapes(None, CPU, dtype="int8")


def test_reference_paths_compute_the_operators():
    """The bench's `reference` path of each kernel-backed operator is that operator."""
    shape = Shape("t", 2, 64, 32, 4, "fp32")
    cases, _ = operator_cases()
    checked = 0
    for case in cases:
        if case.op not in REFERENCES:
            continue
        region = make_region(case.kind, shape, CPU)
        torch.manual_seed(0)
        op = build(case.op, case.options, region)
        x = torch.randn(2, 64, 32)
        with torch.no_grad():
            want, got = op(x), REFERENCES[case.op](op)(x)
        assert got.shape == want.shape, case.label
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=case.label)
        checked += 1
    assert checked >= 1


def test_triton_path_runs_the_kernels(monkeypatch):
    """The `triton` path as a GPU would take it, run here through the Triton interpreter."""
    from graftfx.kernels._dispatch import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shape = Shape("t", 1, 16, 32, 4, "fp32")
    case = OpCase("swa")
    region = make_region(case.kind, shape, CPU)
    op = build(case.op, case.options, region)
    specs = {s.name: s for s in paths_for(case, op, region, torch.device("cuda"), {"triton", "reference"})}
    assert specs["triton"].mode == "triton" and specs["triton"].make() is op
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        with kernels("triton"):
            y_kernel = specs["triton"].make()(x)
        y_ref = specs["reference"].make()(x)
    torch.testing.assert_close(y_kernel, y_ref, rtol=1e-4, atol=1e-4)
    t = time_module(op, x, "fwd", CPU, TimerSettings(0, 1), mode="triton")
    assert t.ms > 0
    cpu_specs = paths_for(case, op, region, CPU, {"triton", "backends"})
    assert all(s.make is None and s.skip == "needs a CUDA GPU" for s in cpu_specs)


# ----------------------------------------------------------------------------- the command
def test_cli_op_prints_table_gpu_note_and_json(capsys, tmp_path):
    if "hyena_x" not in operators():
        pytest.skip("hyena_x is not registered yet")
    out_json = tmp_path / "out" / "bench.json"
    code, out, err = _run(capsys, "--op", "hyena_x", "--tokens", "64", "--dim", "32", "--batch", "1",
                          "--json", str(out_json))
    assert code == 0, err
    assert GPU_NOTE in out
    assert "| op | path | shape | dtype | pass | ms | GB/s | TFLOP/s | % of ceiling |" in out
    assert "command: `graftfx bench --op hyena_x --tokens 64 --dim 32 --batch 1 --json " in out
    data, rows = _results(out_json)
    meta = data["meta"]
    assert meta["torch"] == torch.__version__ and meta["device_type"] == "cpu"
    assert {"date", "triton", "command", "ceilings"} <= set(meta)
    mine = [r for r in rows if r["op"] == "hyena_x"]
    assert {(r["path"], r["pass"]) for r in mine} == {("reference", "fwd"), ("reference", "fwd+bwd")}
    for r in mine:
        assert r["status"] == "ok" and r["ms"] > 0 and r["tokens"] == 64 and r["dim"] == 32
        assert r["flops"] > 0 and r["bytes"] > 0 and r["baseline"] == "sdpa" and r["speedup"] > 0
    assert {r["op"] for r in rows} == {"hyena_x", "sdpa"}


def test_cli_every_registered_operator_runs(capsys, tmp_path):
    out_json = tmp_path / "all.json"
    code, out, err = _run(capsys, "--tokens", "64", "--dim", "32", "--batch", "1",
                          "--paths", "triton,reference", "--json", str(out_json), *FAST)
    assert code == 0, err
    _, rows = _results(out_json)
    cases, _ = operator_cases()
    for case in cases:
        timed = [r for r in rows if r["op"] == case.label and r["status"] == "ok"]
        assert len(timed) == 2, f"{case.label}: {[r['status'] for r in rows if r['op'] == case.label]}"
        if case.op in REFERENCES:   # the kernel path is listed, and says why it is not timed
            kernel = [r for r in rows if r["op"] == case.label and r["path"] == "triton"]
            assert kernel and all(r["status"] == "skipped: needs a CUDA GPU" for r in kernel)
    assert not [r for r in rows if r["status"].startswith("failed")]


def test_cli_crossover_tiny_sweep(capsys, tmp_path):
    registered = operators()
    ops = [o for o in ("swa", "linear_attention", "hyena_y") if o in registered]
    out_json = tmp_path / "x.json"
    code, out, err = _run(capsys, "--crossover", "--sweep", "16", "32", "--op", ",".join(ops + ["mlp"]),
                          "--dim", "32", "--batch", "1", "--json", str(out_json), *FAST)
    assert code == 0, err
    assert GPU_NOTE in out and "overtakes SDPA at L" in out and "L=16" in out and "L=32" in out
    assert "sweep shortened" not in out                      # the sweep was given
    data, _ = _results(out_json)
    summary = data["crossover"]
    assert {(s["op"], s["pass"]) for s in summary} == {(o, p) for o in ops for p in ("fwd", "fwd+bwd")}
    for s in summary:
        assert [p["tokens"] for p in s["points"]] == [16, 32]
        assert all(p["status"] == "ok" and p["ms"] > 0 and p["sdpa_ms"] > 0 for p in s["points"])
        assert s["crossover"]["text"]


def test_cli_crossover_default_cpu_sweep_says_so(capsys):
    code, out, err = _run(capsys, "--crossover", "--op", "swa", "--dim", "16", "--heads", "2",
                          "--batch", "1", "--forward-only", *FAST)
    assert code == 0, err
    assert f"sweep shortened to L = {CPU_SWEEP[0]}..{CPU_SWEEP[1]}" in out
    assert f"L={CPU_SWEEP[1]}" in out


def test_cli_model_times_the_matched_regions(capsys, tmp_path):
    from graftfx.models.zoo import resolve_model

    rules = "dit-xl2-mha-swa-50p.toml"
    model, args, kwargs = resolve_model("DiT-S/8", meta=True)
    plan = graftfx.select(graftfx.trace(model, args, kwargs), graftfx.load_rules(rules))
    chosen = [region for _, region in plan.selected]
    out_json = tmp_path / "m.json"
    code, out, err = _run(capsys, "--model", "DiT-S/8", "--rules", rules, "--json", str(out_json), *FAST)
    assert code == 0, err
    assert GPU_NOTE in out and "selected regions" in out
    data, rows = _results(out_json)
    swa = [r for r in rows if r["op"] == "swa"]
    sdpa = [r for r in rows if r["op"] == "sdpa"]
    assert swa and sdpa and all(r["status"] == "ok" for r in swa + sdpa)
    assert {r["regions"] for r in swa} == {len(chosen)}
    assert {(r["tokens"], r["dim"], r["heads"]) for r in swa} == {(chosen[0].tokens, chosen[0].width,
                                                                   chosen[0].heads)}
    assert all(t["speedup"] > 0 for t in data["model"]["totals"])


@pytest.mark.parametrize("argv, names", [
    (["--op", "no_such_op"], "no_such_op"),
    (["--shape", "dit-xl3"], "dit-xl3"),
    (["--model", "DiT-S/8"], "--rules"),
    (["--sweep", "16", "32"], "--sweep"),
    (["--crossover", "--op", "mlp"], "--crossover"),
    (["--paths", "gpu"], "--paths"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, names):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and names in err


def test_help_explains_every_flag(capsys):
    import argparse

    from graftfx.bench.cli import build

    parser = argparse.ArgumentParser()
    build(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 10
    for action in options:
        assert action.help and len(action.help) > 15, action.option_strings
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Triton" in out and "--crossover" in out
