"""graftfx bench on the CPU at tiny shapes: the timer, the cost and crossover arithmetic, the
cases and paths taken from the registry and the operator protocol (a toy operator registered
here must show up and be timed through its own kernel_reference), and the command end to end.
Timings are never asserted, only their sanity."""
import ast
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import graftfx
import graftfx.bench
import graftfx.registry
from graftfx.bench.cases import (BASELINES, CPU_DIM_DIV, CPU_TOKENS_DIV, KINDS, MLP, PRESETS, OpCase, Shape,
                                 bench_kind, build, make_region, operator_cases, paths_for, resolve_shapes)
from graftfx.bench.crossover import CPU_SWEEP, crossover_path, crossover_point, sweep_lengths
from graftfx.bench.harness import measure_ceilings, time_callable
from graftfx.bench.report import GPU_NOTE
from graftfx.bench.runner import Bench, TimerSettings, bytes_moved, count_units, time_module
from graftfx.cli import main
from graftfx.errors import GraftError
from graftfx.match.grid import square_grid
from graftfx.operator import Backend, Operator
from graftfx.registry import operators, register_operator

CPU = torch.device("cpu")
FAST = ["--rep-ms", "2", "--warmup-ms", "0"]


TOY, TOY_CROSS = "bench_toy", "bench_toy_cross"
CALLS = {"kernel": 0, "kernel_reference": 0}


@dataclass
class ToyConfig:
    gain: float = 1.0

    def __post_init__(self):
        if not self.gain > 0:
            raise ValueError(f"gain must be > 0, got {self.gain!r}")


class Toy(Operator):
    """A toy MLP replacement whose core has a kernel and a reference (counted calls)."""

    bench_options = ({}, {"gain": 2.0})
    backends = (Backend("torch", {"gain": 3.0}, (torch.float16,)),      # installed, fp16 only
                Backend("bench_toy_missing_package", {"gain": 4.0}))

    def __init__(self, dim: int, config: ToyConfig):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(dim, dim)

    @classmethod
    def from_region(cls, region, config):
        return cls(region.width, config)

    def forward(self, x):
        return self.fc(self.kernel(x))

    def kernel(self, u):
        CALLS["kernel"] += 1
        return torch.tanh(u) * self.config.gain

    def kernel_reference(self, u):
        CALLS["kernel_reference"] += 1
        return torch.tanh(u.float()).to(u.dtype) * self.config.gain

    def flops(self, tokens):
        return 2 * tokens * self.fc.in_features * self.fc.out_features


class ToyCross(Operator):
    """A plain-PyTorch cross-attention-only replacement: the bench has no region for it."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    @classmethod
    def from_region(cls, region, config):
        return cls(config)

    def forward(self, x, context=None):
        return x

    def flops(self, tokens):
        return 0


@pytest.fixture
def toy():
    register_operator(TOY, config=ToyConfig, kinds=("mlp",), loss="l2")(Toy)
    register_operator(TOY_CROSS, config=ToyConfig, kinds=("cross_attention",))(ToyCross)
    CALLS.update(kernel=0, kernel_reference=0)
    yield Toy
    graftfx.registry.OPERATORS.pop(TOY, None)
    graftfx.registry.OPERATORS.pop(TOY_CROSS, None)
    assert TOY not in operators()



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


def test_shape_grids_follow_graftfx_match_grid():
    for tokens in (16, 32, 64, 128, 256):
        shape = Shape("t", 1, tokens, 32, 4, "fp32")
        assert shape.grid == square_grid(tokens)
        assert make_region("self_attention", shape, CPU).grid == square_grid(tokens)
    assert Shape("t", 1, 32, 32, 4, "fp32").grid is None                  # not square: no grid
    assert Shape("t", 1, 64, 32, 4, "fp32").grid == (8, 8)


def test_cases_are_the_registry_in_kind_then_name_order():
    registered = operators()
    cases, notes = operator_cases()
    benched = {n: bench_kind(spec.kinds) for n, spec in registered.items() if bench_kind(spec.kinds)}
    want = [(name, dict(options)) for name in sorted(benched, key=lambda n: (KINDS.index(benched[n]), n))
            for options in registered[name].cls.bench_options]
    assert [(c.op, c.options) for c in cases] == want
    assert len({c.label for c in cases}) == len(cases)                     # variants are told apart
    kinds = [KINDS.index(c.kind) for c in cases]
    assert kinds == sorted(kinds)
    for c in cases:
        assert c.kind == bench_kind(registered[c.op].kinds) and c.operator is registered[c.op].cls
    # each operator's variants are its own bench_options, e.g. the MLP baseline's other widths
    mlp_base = BASELINES[MLP].op
    assert [c.options for c in cases if c.op == mlp_base] == list(registered[mlp_base].cls.bench_options)
    # --op keeps the order given, without repeats
    picked, _ = operator_cases([mlp_base, cases[0].op, mlp_base])
    assert [c.op for c in picked] == [mlp_base] * len(registered[mlp_base].cls.bench_options) + [
        cases[0].op] * len(registered[cases[0].op].cls.bench_options)
    assert not [n for n in notes if "not registered" in n]


def test_a_registered_operator_is_benched_through_its_protocol(toy):
    cases, notes = operator_cases()
    mine = [c for c in cases if c.op == TOY]
    assert [(c.label, c.options, c.kind) for c in mine] == [
        (TOY, {}, "mlp"), (f"{TOY} gain=2.0", {"gain": 2.0}, "mlp")]
    mlp_names = [c.op for c in cases if c.kind == "mlp"]
    assert mlp_names == sorted(mlp_names)
    assert f"{TOY_CROSS}: replaces cross_attention regions only; not benched" in notes
    assert all(c.op != TOY_CROSS for c in cases)

    shape = Shape("t", 2, 16, 8, None, "fp32")
    region = make_region("mlp", shape, CPU)
    op = build(TOY, {}, region)
    assert isinstance(op, Toy)
    x = torch.randn(2, 16, 8)
    everything = {"triton", "reference", "compile", "backends"}

    cpu = {s.name: s for s in paths_for(mine[0], op, region, CPU, everything)}
    assert list(cpu) == ["triton", "reference", "compile", "torch", "bench_toy_missing_package"]
    assert cpu["triton"].make is None and cpu["triton"].skip == "needs a CUDA GPU"
    assert cpu["torch"].make is None and cpu["torch"].skip == "needs a CUDA GPU"
    ref = cpu["reference"].make()
    assert ref is not op and cpu["reference"].mode == "reference"
    assert [p.data_ptr() for p in ref.parameters()] == [p.data_ptr() for p in op.parameters()]
    CALLS.update(kernel=0, kernel_reference=0)
    with torch.no_grad():
        got = ref(x)
    assert CALLS == {"kernel": 0, "kernel_reference": 1}                  # the reference path's core
    with torch.no_grad():
        want = op(x)
    assert CALLS == {"kernel": 1, "kernel_reference": 1}                  # the operator's own core
    torch.testing.assert_close(got, want)

    cuda = {s.name: s for s in paths_for(mine[0], op, region, torch.device("cuda"), everything)}
    from graftfx.kernels._dispatch import HAS_TRITON
    if HAS_TRITON:
        assert cuda["triton"].make() is op and cuda["triton"].mode == "triton"
    assert cuda["torch"].skip == "torch runs fp16 only"                   # a backend dtype it lacks
    assert cuda["bench_toy_missing_package"].skip == "bench_toy_missing_package is not installed"
    half = make_region("mlp", Shape("t", 2, 16, 8, None, "fp16"), CPU)
    built = {s.name: s for s in paths_for(mine[1], build(TOY, mine[1].options, half), half,
                                          torch.device("cuda"), {"backends"})}
    assert built["torch"].skip == "" and built["torch"].mode is None
    backend_op = built["torch"].make()                                   # the case's options + the backend's
    assert isinstance(backend_op, Toy) and backend_op.config.gain == 3.0

    # timed by the runner: the reference path runs kernel_reference only
    CALLS.update(kernel=0, kernel_reference=0)
    bench = Bench(CPU, TimerSettings(0, 1), None, passes=("fwd", "fwd+bwd"), groups={"reference"})
    rows = bench.case(mine[1], region, shape, "t", x, None)
    assert [(r.path, r.pass_, r.status) for r in rows] == [
        ("reference", "fwd", "ok"), ("reference", "fwd+bwd", "ok")]
    assert CALLS["kernel"] == 0 and CALLS["kernel_reference"] >= 2 * 4   # 4+ calls per timing
    assert rows[0].flops == 2 * 16 * 8 * 8 * 2                            # the operator's flops x batch
    assert count_units(mine, 1, bench) == 2 * 2 + 2                       # 2 cases x 2 passes + baseline
    assert crossover_path(mine[0], CPU) == "reference"
    assert crossover_path(mine[0], torch.device("cuda")) == "triton"


def test_reference_paths_compute_the_operators():
    """Every registered operator's `reference` path is op.reference(): the same weights, the
    core through kernel_reference, the same output; plain-PyTorch operators time `eager`."""
    shape = Shape("t", 2, 64, 32, 4, "fp32")
    cases, _ = operator_cases()
    checked = 0
    for case in cases:
        region = make_region(case.kind, shape, CPU)
        torch.manual_seed(0)
        op = build(case.op, case.options, region)
        (spec,) = paths_for(case, op, region, CPU, {"reference"})
        ref = spec.make()
        if not type(op).has_reference():
            assert spec.name == "eager" and spec.mode is None and ref is op, case.label
            continue
        assert spec.name == "reference" and spec.mode == "reference" and ref is not op, case.label
        assert ref.kernel.__func__ is type(op).kernel_reference, case.label
        assert [p.data_ptr() for p in ref.parameters()] == [p.data_ptr() for p in op.parameters()], case.label
        x = torch.randn(2, 64, 32)
        with torch.no_grad():
            want, got = op(x), ref(x)
        assert got.shape == want.shape, case.label
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=case.label)
        checked += 1
    assert checked >= 1


def test_operators_that_need_a_grid_are_skipped_with_their_own_reason():
    """At a non-square token count the hand-made region has no grid: an operator that needs
    one is skipped with the message its build gives; every other operator is timed."""
    shape = Shape("t", 1, 32, 32, 4, "fp32")
    bench = Bench(CPU, TimerSettings(0, 1), None, passes=("fwd",), groups={"reference"})
    x = bench.input(shape)
    cases, _ = operator_cases()
    skipped = []
    for case in cases:
        region = make_region(case.kind, shape, CPU)
        try:
            build(case.op, case.options, region, case.label)     # as Bench.case builds it
            reason = None
        except GraftError as e:
            reason = str(e)
        rows = bench.case(case, region, shape, "t", x, None)
        if reason is None:
            assert [r.status for r in rows] == ["ok"], case.label
        else:
            assert len(rows) == 1 and rows[0].path == "-", case.label
            assert rows[0].status == f"skipped: GraftError: {reason}", case.label
            assert "token grid" in reason, case.label
            skipped.append(case.op)
    if "nat2d" in operators():
        assert "nat2d" in skipped


def test_bench_code_names_no_operator():
    """graftfx/bench asks the registry: no string in its code is an operator's name, and the
    baselines' names appear once (BASELINES); the help and docstrings may mention operators."""
    others = set(operators()) - {b.op for b in BASELINES.values()}
    assert others
    names = "|".join(map(re.escape, sorted(others, key=len, reverse=True)))
    pattern = re.compile(rf"(^|_)({names})($|_)")
    seen = {b.op: 0 for b in BASELINES.values() if b.op not in KINDS}
    for path in sorted(Path(graftfx.bench.__file__).parent.glob("*.py")):
        if path.name == "kernels.py":   # kernel-level cases name the kernel packages (graftfx.kernels.*) by design
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in others, f"{path.name}:{node.lineno} names {node.value!r}"
                if node.value in seen:
                    seen[node.value] += 1
            ident = (node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                     node.id if isinstance(node, ast.Name) else
                     node.attr if isinstance(node, ast.Attribute) else
                     node.arg if isinstance(node, ast.arg) else None)
            if ident:
                assert not pattern.search(ident.lower()), f"{path.name}:{node.lineno} names {ident!r}"
    assert all(n == 1 for n in seen.values()), seen


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


def test_cli_times_a_newly_registered_operator(capsys, tmp_path, toy):
    out_json = tmp_path / "toy.json"
    code, out, err = _run(capsys, "--op", TOY, "--tokens", "16", "--dim", "8", "--batch", "1",
                          "--forward-only", "--json", str(out_json), *FAST)
    assert code == 0, err
    _, rows = _results(out_json)
    assert [(r["op"], r["path"], r["status"]) for r in rows] == [
        ("mlp r=4", "eager", "ok"), (TOY, "reference", "ok"), (f"{TOY} gain=2.0", "reference", "ok")]
    assert all(r["baseline"] == "mlp r=4" for r in rows[1:])
    assert CALLS["kernel"] == 0 and CALLS["kernel_reference"] >= 2      # a CPU times the reference
    assert f"| {TOY} gain=2.0 | reference |" in out


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
        if case.operator.has_reference():   # the kernel path is listed, and says why it is not timed
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


def test_cli_crossover_skips_a_grid_operator_at_non_square_lengths(capsys, tmp_path):
    if "nat2d" not in operators():
        pytest.skip("nat2d is not registered")
    out_json = tmp_path / "grid.json"
    code, out, err = _run(capsys, "--crossover", "--sweep", "16", "32", "--op", "nat2d", "--dim", "16",
                          "--heads", "2", "--batch", "1", "--json", str(out_json), *FAST)
    assert code == 0, err
    data, rows = _results(out_json)
    assert {s["pass"] for s in data["crossover"]} == {"fwd", "fwd+bwd"}
    for s in data["crossover"]:
        first, second = s["points"]
        assert (first["tokens"], first["status"]) == (16, "ok") and first["speedup"] > 0
        assert second["tokens"] == 32 and second["speedup"] is None
        assert second["status"].startswith("skipped: GraftError:")
        assert "nat2d needs the token grid" in second["status"]
    assert "| nat2d | reference | fwd+bwd |" in out and "skipped |" in out


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
