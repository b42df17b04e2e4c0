"""graftfx bench --kernels on the CPU: the kernels' own byte/FLOP counts against hand counts, the
output check before timing (a wrong path is reported failing and never timed; the zero cotangent
outside the reference's slice makes shared-input gradients comparable), flex_attention's
sliding-window and 2D-neighbourhood masks against the dense masked SDPA, and the command end to
end at its quick shape (every kernel row, the Triton path checked through the interpreter).
Timings are never asserted, only their sanity."""
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from graftfx.bench import kernels as kb
from graftfx.bench.runner import TimerSettings
from graftfx.cli import main
from graftfx.kernels import cases as kc
from graftfx.kernels.nat2d.naive import nat2d_mask
from graftfx.kernels.swa.naive import swa_mask

CPU = torch.device("cpu")
TIMER = TimerSettings(0, 1)
GROUP = kb.Group("t", 1, 16, 16, 8)


# ----------------------------------------------------------------------------- counts
# (case, fwd FLOPs, fwd+bwd FLOPs, fwd bytes, fwd+bwd bytes) at bf16, counted by hand:
COUNTS = [
    # C = 3*4 = 12 channels, K = 4: 2*B*L*C*K; u = 2*8*12*2 B, y = 2*8*4*2 B: u + y, 3u + 2y
    (lambda: kc.hyena_x_case(8, B=2, width=4, taps=4), 1536, 4608, 512, 1408),
    # H = 2, keys = 2w+1 = 5: 4*1*2*16*5*8; t = 1*2*16*8*2 = 512 B, lse = 2*16*4 = 128 B
    (lambda: kc.swa_case(16, 8, 2, B=1, width=16), 5120, 17920, 4 * 512 + 128, 12 * 512 + 256),
    # 4x4 grid, k = 3: 9 keys
    (lambda: kc.nat2d_case(4, 8, 3, B=1, width=16), 9216, 32256, 4 * 512 + 128, 12 * 512 + 256),
    # 4*B*H*L*D^2 = 4*2*16*64; fwd+bwd 4x; 4t, 11t
    (lambda: kc.linear_attn_case(16, 8, B=1, width=16), 8192, 32768, 2048, 5632),
    # d_inner 32, H 2, N 8, G 1, Q 16: 2*32*(16*8 + 16*32 + 2*8*32); x = 2048 B, bc = 1024 B,
    # dt (fp32) = 256 B: 2x + bc + dt; 5x + 3bc + 3dt
    (lambda: kc.mamba2_case(32, B=1, width=16, d_state=8, headdim=16, chunk=16), 73728, 258048,
     5376, 14080),
]


@pytest.mark.parametrize("make, fwd, both, fwd_bytes, both_bytes", COUNTS,
                         ids=[f for f in kb.FAMILIES])
def test_counts_match_hand_counts(make, fwd, both, fwd_bytes, both_bytes):
    case = make()
    bench = kb.KernelBench(CPU, torch.bfloat16, TIMER)
    kernel = kb.paths_for(case, CPU, torch.bfloat16)[0]
    rows = {p: bench._row(GROUP, case, kernel, p, 2) for p in kb.PASSES}
    assert (rows["fwd"].flops, rows["fwd+bwd"].flops) == (fwd, both)
    assert (rows["fwd"].bytes, rows["fwd+bwd"].bytes) == (fwd_bytes, both_bytes)
    assert case.family in kb.COUNTS and case.family in kb.TITLES


def test_dense_attention_rows_are_credited_with_full_attention():
    case = kc.swa_case(16, 8, 2, B=1, width=16)
    dense = next(p for p in kb.paths_for(case, CPU, torch.float32) if p.role == kb.DENSE)
    row = kb.KernelBench(CPU, torch.float32, TIMER)._row(GROUP, case, dense, "fwd", 4)
    assert row.flops == 4 * 1 * 2 * 16 * 16 * 8 and dense.flops("fwd+bwd") == 3.5 * row.flops


# ----------------------------------------------------------------------------- the output check
def _counted(fn, calls, name):
    def run(x):
        calls[name] = calls.get(name, 0) + 1
        return fn(x)
    return run


def _reversed_taps(x):           # a classic conv bug: Conv1d tap order flipped
    return kb._conv1d_gate({**x, "weight": x["weight"].flip(1)})


def _no_grads(x):                # the right output, gradients that go nowhere
    return kb._conv1d_gate(x).detach() + 0.0 * x["u"][..., :1].sum()


def test_a_wrong_path_fails_its_check_and_is_never_timed(monkeypatch):
    case = kc.hyena_x_case(32, B=2, width=16)
    calls: dict = {}
    paths = [kb.Path("F.conv1d + gate", kb.BASELINE, _counted(kb._conv1d_gate, calls, "good")),
             kb.Path("reversed taps", kb.BASELINE, _counted(_reversed_taps, calls, "taps")),
             kb.Path("no grads", kb.BASELINE, _counted(_no_grads, calls, "grads"))]
    monkeypatch.setattr(kb, "paths_for", lambda *a: paths)
    rows = {(r.path, r.pass_): r for r in kb.KernelBench(CPU, torch.float32, TIMER).case(GROUP, case)}
    for p in kb.PASSES:
        good = rows["F.conv1d + gate", p]
        assert good.ok and good.ms > 0 and good.check.startswith("ok: out")
        bad = rows["reversed taps", p]
        assert bad.status == "failed check" and bad.ms is None and bad.gbps is None
        assert bad.check.startswith("FAILED: out")
    assert calls["taps"] == 1                     # the check's one call, no timing
    assert calls["good"] > 4                      # check + timed calls of both passes
    # right forward, wrong gradients: the forward is timed, fwd+bwd is not
    assert rows["no grads", "fwd"].ok and rows["no grads", "fwd"].ms > 0
    assert rows["no grads", "fwd+bwd"].status == "failed check"
    assert rows["no grads", "fwd+bwd"].ms is None and "FAILED" in rows["no grads", "fwd+bwd"].check
    # a raising path is a failure with its reason, not a crash of the run
    paths[:] = [kb.Path("raises", kb.BASELINE, lambda x: 1 / 0)]
    (row, _) = kb.KernelBench(CPU, torch.float32, TIMER).case(GROUP, case)
    assert row.status.startswith("failed: ZeroDivisionError") and row.ms is None


def test_reference_slices_compare_shared_gradients():
    """Mamba-2 at B=2: the reference sees batch 0, so A and D (summed over the batch) compare
    only because the path's cotangent is zero outside that slice; attention sees 2 of 4 heads."""
    ssd = kc.mamba2_case(32, B=2, width=32, d_state=16, chunk=16)
    inputs = ssd.make(CPU, torch.float32, seed=3)
    ref = kb.Reference(ssd, inputs, ssd.reference, True, torch.float32)
    assert ref.out.shape[0] == 1 and ref.shapes["A"] == (ssd.dims["H"],)
    c = kb.check_path(kb.Path("same", kb.BASELINE, ssd.reference), inputs, ref, kb.TOL["fp32"])
    assert c.passes("fwd+bwd") and c.out < 1e-6 and c.grad < 1e-5
    # the same path with a cotangent over the whole batch would disagree on dA: the check sees it
    doubled = kb.Path("2x", kb.BASELINE, lambda x: torch.cat([ssd.reference(x)[:1] * 2,
                                                             ssd.reference(x)[1:]]))
    assert not kb.check_path(doubled, inputs, ref, kb.TOL["fp32"]).passes("fwd")

    attn = kc.swa_case(24, 8, 3, B=2, width=32)                              # 4 heads
    inputs = attn.make(CPU, torch.float32, seed=4)
    ref = kb.Reference(attn, inputs, attn.reference, True, torch.float32)
    assert ref.out.shape[:2] == (1, 2)
    masked = next(p for p in kb.paths_for(attn, CPU, torch.float32) if p.name == "sdpa + mask")
    c = kb.check_path(masked, inputs, ref, kb.TOL["fp32"])
    assert c.passes("fwd+bwd"), c.text("fwd+bwd")


# ----------------------------------------------------------------------------- flex_attention
def test_flex_masks_equal_the_kernels_masks_and_dense_masked_sdpa():
    from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

    L, w = 40, 3
    got = create_mask(kb.window_mask_mod(w), None, None, L, L, device="cpu")[0, 0]
    assert torch.equal(got, swa_mask(L, w))
    for h, wd, k in ((5, 7, 3), (3, 8, 5), (6, 6, 7)):        # shifted borders; k > an axis
        got = create_mask(kb.neighbourhood_mask_mod(h, wd, k), None, None, h * wd, h * wd, device="cpu")
        assert torch.equal(got[0, 0], nat2d_mask(h, wd, k)), (h, wd, k)

    q, k_, v = torch.randn(3, 1, 2, L, 16).unbind(0)
    for mod, keep in ((kb.window_mask_mod(w), swa_mask(L, w)),
                      (kb.neighbourhood_mask_mod(5, 8, 3), nat2d_mask(5, 8, 3))):
        block = create_block_mask(mod, None, None, L, L, device="cpu")
        with warnings.catch_warnings():             # eager on a CPU: "without torch.compile"
            warnings.simplefilter("ignore", UserWarning)
            out = flex_attention(q, k_, v, block_mask=block)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k_, v, attn_mask=keep),
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_json = tmp_path_factory.mktemp("kbench") / "kernels.json"
    import contextlib
    import io

    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        code = main(["bench", "--kernels", "--quick", "--rep-ms", "1", "--warmup-ms", "0",
                     "--json", str(out_json)])
    return code, buf.getvalue(), err.getvalue(), json.loads(out_json.read_text())


def test_cli_kernels_quick_prints_every_kernel(quick_run):
    code, out, err, data = quick_run
    failed = [(r["kernel"], r["path"], r["pass"], r["status"], r["check"]) for r in data["kernels"]
              if r["status"].startswith("failed")]
    assert code == 0 and not failed, failed
    assert kb.CPU_NOTE in out
    assert "| kernel | shape | dtype | pass | path | check (rel. error) | ms |" in out
    rows = data["kernels"]
    table = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| kernel |")]
    assert len(table) == len(rows)
    assert [r["kernel"] for r in rows if r["path"] == "graftfx" and r["pass"] == "fwd"] == list(kb.FAMILIES)
    for r in rows:
        assert r["pass"] in kb.PASSES and r["status"] != "ok" or r["ms"] > 0
        if r["path"] == "graftfx":        # checked through the interpreter, never timed
            assert r["status"] == "skipped: CPU: no kernel timings" and r["ms"] is None
            assert r["check"].startswith("interpreter, ") and ": ok: out" in r["check"]
        elif r["status"] == "ok":
            assert r["check"].startswith("ok: out")
            assert math.isclose(r["gbps"], r["bytes"] / (r["ms"] * 1e-3) / 1e9, rel_tol=1e-9)
            assert math.isclose(r["tflops"], r["flops"] / (r["ms"] * 1e-3) / 1e12, rel_tol=1e-9)
    timed = {(r["kernel"], r["path"]) for r in rows if r["status"] == "ok" and r["pass"] == "fwd+bwd"}
    for want in [("hyena_x", "F.conv1d + gate"), ("swa", "sdpa + mask"), ("nat2d", "sdpa (full)"),
                 ("linear_attn", "torch matmuls"), ("mamba2", "reference (fp32)")]:
        assert want in timed, want
    flex = [r for r in rows if r["path"] == "flex_attention (eager)"]
    assert {r["kernel"] for r in flex} == {"swa", "nat2d"}
    assert all((r["status"] == "ok") == (r["pass"] == "fwd") for r in flex)
    assert data["targets"] and all(t["met"] is None and kb.CPU_NOTE in t["text"] for t in data["targets"])
    assert "Targets:" in out and "at least as fast as its best baseline" in out


def test_cli_kernels_bad_arguments_exit_2_with_one_line(capsys):
    for argv, names in ((["--quick"], "--quick"), (["--kernels", "--op", "mlp"], "--op"),
                        (["--kernels", "--kernel", "nope"], "nope"),
                        (["--kernels", "--budget-s", "0"], "--budget-s")):
        assert main(["bench", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and names in err, err


def test_interpreter_failure_marks_the_kernel_row():
    case = kc.linear_attn_case(16, 8, B=1, width=16)
    bad = {"out": 0.5, "grad": 0.1, "worst": "dq", "error": "", "tol": 1e-3, "case": "tiny"}
    bench = kb.KernelBench(CPU, torch.float32, TIMER, ("fwd",), interpreter={case.family: bad})
    monkey = [p for p in kb.paths_for(case, CPU, torch.float32) if p.role == kb.KERNEL]
    rows = []
    for p in monkey:
        made = [bench._row(GROUP, case, p, "fwd", 4)]
        bench._interpreted(case, p, made)
        rows += made
    assert rows and rows[0].status == "failed check (Triton interpreter, tiny shape)"
    assert rows[0].check.startswith("interpreter, tiny: FAILED: out 5.0e-01")


# ----------------------------------------------------------------------------- fla adapters
def _fake_causal_linear(q, k, v, scale=None, normalize=True, **kw):
    """fla's chunk_linear_attn semantics ([B, T, H, K], causal, unnormalised here)."""
    assert not normalize and "head_first" not in kw
    state = torch.einsum("bthk,bthv->bthkv", k, v).cumsum(1)               # sum over s <= t
    return scale * torch.einsum("bthk,bthkv->bthv", q, state), None


def _fake_simple_gla(q, k, v, g, scale=None, **kw):
    """fla's chunk_simple_gla: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale q_t S_t."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    out = []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None, None] * S + k[:, t, :, :, None].float() * v[:, t, :, None, :].float()
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S))
    return torch.stack(out, 1).to(v.dtype), None


def test_fla_adapters_compute_the_kernels_functions(monkeypatch):
    """The fla paths run only on CUDA with fla installed; here fla's documented semantics stand
    in (causal linear attention, simple GLA) to check the adapters' algebra: non-causal sums
    from a causal pass and a reversed one, and the SSD scan as simple GLA plus D x."""
    import sys
    import types

    for name, attrs in (("fla", {}), ("fla.ops", {}),
                        ("fla.ops.linear_attn", {"chunk_linear_attn": _fake_causal_linear}),
                        ("fla.ops.simple_gla", {"chunk_simple_gla": _fake_simple_gla})):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    for case, fn in ((kc.linear_attn_case(24, 8, B=2, width=16), kb._fla_linear),
                     (kc.mamba2_case(24, B=2, width=16, d_state=8, chunk=16), kb._fla_ssd)):
        inputs = case.make(CPU, torch.float32, seed=5)
        ref = kb.Reference(case, inputs, case.reference, True, torch.float32)
        c = kb.check_path(kb.Path("fla", kb.BASELINE, fn), inputs, ref, kb.TOL["fp32"])
        assert c.passes("fwd+bwd"), (case.family, c.text("fwd+bwd"))


# ----------------------------------------------------------------------------- targets
def _row(kernel, path, role, ms, pass_="fwd+bwd", group="pixart-2048", case=None, **dims):
    r = kb.Row(kernel, case or f"{kernel} case", group, path, role, "bf16", pass_, dims,
               ms=ms, flops=10 ** 12, bytes=8 * 10 ** 8)
    r.gbps = r.bytes / (ms * 1e-3) / 1e9
    return r


def test_targets_are_ratios_of_the_run():
    """The GPU arithmetic of the targets, on made-up timings (a CPU has no kernel timings)."""
    from graftfx.bench.harness import Ceilings

    rows = [_row("hyena_x", "graftfx", kb.KERNEL, 1.0),                    # 800 GB/s
            _row("hyena_x", "F.conv1d + gate", kb.BASELINE, 3.0),
            _row("swa", "graftfx", kb.KERNEL, 2.0, window=4, L=16384),
            _row("swa", "flex_attention", kb.BASELINE, 1.6, window=4, L=16384),   # flex faster
            _row("swa", "sdpa (full)", kb.DENSE, 9.0, window=4, L=16384),
            _row("mamba2", "graftfx", kb.KERNEL, 1.0),
            _row("mamba2", "mamba_ssm chunk_scan_combined", kb.BASELINE, 1.0)]
    rows[-1].status = "skipped: mamba_ssm is not installed"
    for kernel in ("hyena_x", "swa", "mamba2"):
        kb._compare([r for r in rows if r.kernel == kernel])
    assert rows[3].speedup == pytest.approx(0.8) and rows[4].speedup == pytest.approx(4.5)
    goals = {t["target"]: t for t in kb.targets(rows, Ceilings(1000.0, 1.0, 1, 1, "bf16"), cuda=True)}
    bw = goals["Hyena featurizer fwd+bwd >= 80% of the measured copy bandwidth"]
    assert bw["value"] == pytest.approx(0.8) and bw["met"] and bw["text"].startswith("80% (met")
    fused = goals["Hyena featurizer fwd+bwd >= 2x the unfused F.conv1d + gate"]
    assert fused["value"] == pytest.approx(3.0) and fused["met"]
    flex = goals["swa faster than flex_attention: w=4 L=16384 fwd+bwd"]
    assert flex["value"] == pytest.approx(0.8) and flex["met"] is False
    best = goals["swa at least as fast as its best baseline at pixart-2048 fwd+bwd"]
    assert best["met"] is False and "flex_attention" in best["text"] and "25% slower" in best["text"]
    ssd = goals["mamba2 at least as fast as its best baseline at pixart-2048 fwd+bwd"]
    assert ssd["met"] is None and "no baseline timed" in ssd["text"]
    assert all(t["met"] is None for t in kb.targets(rows, None, cuda=False))
