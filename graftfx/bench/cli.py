"""``graftfx bench``: operator microbenchmarks, the crossover report, and model-shape timings."""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from typing import Callable

from graftfx.errors import GraftError

HELP = "operator microbenchmarks: Triton vs reference vs torch.compile vs SDPA; crossover report"
DESCRIPTION = (
    "Time each registered operator (hyena_x, hyena_y, hyena_se, hyena_x2d, swa, nat2d, "
    "linear_attention, mamba2, mlp r=3/6, mlp_hyena_x, mha) on every path it has: its Triton "
    "kernels, its plain-PyTorch reference, torch.compile of the reference, and the optional "
    "backends that are installed (flash_attn, mamba_ssm, causal_conv1d), against the region it "
    "replaces (attention through scaled_dot_product_attention, or the original MLP), forward and "
    "forward+backward. Shapes: DiT-XL/2 (dit-xl2: L=256) and PixArt-Sigma (pixart-1024: L=4096, "
    "pixart-2048: L=16384), D=1152, 16 heads, batch 8, bf16. On a GPU the timer is "
    "triton.testing.do_bench (median), next to the device's measured copy bandwidth and matmul "
    "throughput. On a CPU only the reference paths and SDPA are timed (median wall time), and the "
    "presets are scaled down (B=1, L/4, D/4, heads/4, fp32) unless --full. FLOPs come from each "
    "operator's flops(tokens) (fwd+bwd = 3x fwd); bytes from a compulsory-traffic model "
    "(fwd = x + W + y, fwd+bwd = 3x + 3W + 2y). --crossover sweeps L over powers of two and "
    "reports where each attention replacement overtakes SDPA; --model/--rules times the operators "
    "at the shapes matched in a model. --kernels times each kernel core on its own (Hyena "
    "featurizer, sliding-window, 2D neighbourhood and linear attention, the Mamba-2 scan) with its "
    "own byte and FLOP counts against flex_attention, SDPA (masked and full), torch, fla, "
    "mamba_ssm, F.conv1d and causal_conv1d where they run, checks every path against the fp32 "
    "reference before timing it, and reports the issue-14 targets as ratios.")

# (dest, flag, default) of every option, in order: the header reprints the exact command.
_FLAGS: list[tuple[str, str, object]] = []


def _add(p: argparse.ArgumentParser, flag: str, **kw) -> None:
    action = p.add_argument(flag, **kw)
    _FLAGS.append((action.dest, flag, action.default))


def _remember_argv(p: argparse.ArgumentParser) -> None:
    """Keep the arguments given after ``bench`` (as typed) on the namespace, for the header."""
    parse = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, rest = parse(args, namespace)
        if args is not None:
            ns.bench_argv = [str(a) for a in args]
        return ns, rest
    p.parse_known_args = parse_known_args


def build(p: argparse.ArgumentParser) -> None:
    _FLAGS.clear()
    _remember_argv(p)
    _add(p, "--op", action="append", metavar="NAME",
         help="operator(s) to time, by registry name; repeat or comma-separate "
              "(default: every registered operator; `graftfx rules` lists them)")
    _add(p, "--shape", action="append", metavar="NAME",
         help="preset shape(s): dit-xl2 (B8 L256 D1152 H16 bf16), pixart-1024 (L4096), "
              "pixart-2048 (L16384); repeat or comma-separate (default: all three on a GPU, "
              "dit-xl2 on a CPU)")
    _add(p, "--batch", type=int, metavar="B", help="override the batch size")
    _add(p, "--tokens", type=int, metavar="L", help="override the token count")
    _add(p, "--dim", type=int, metavar="D", help="override the width")
    _add(p, "--heads", type=int, metavar="H",
         help="override the heads (default: the preset's, or the largest divisor of --dim below it)")
    _add(p, "--dtype", metavar="DTYPE", help="bf16, fp16 or fp32 (default: bf16; fp32 on a CPU)")
    _add(p, "--full", action="store_true",
         help="on a CPU, keep the presets' real shapes instead of scaling them down")
    _add(p, "--device", default="auto", metavar="DEVICE",
         help="auto (CUDA when visible, else CPU), cuda or cpu (default: auto)")
    _add(p, "--threads", type=int, metavar="N",
         help="CPU intra-op threads (torch.set_num_threads; default: torch's, stated in the header); "
              "1 gives steadier numbers on a busy machine")
    _add(p, "--paths", metavar="LIST",
         help="comma-separated path groups to time: triton, reference (or eager), compile, backends "
              "(flash_attn/mamba_ssm/causal_conv1d); the baseline is always timed "
              "(default: all on a GPU; reference on a CPU)")
    _add(p, "--forward-only", action="store_true", help="time the forward pass only (no fwd+bwd)")
    _add(p, "--crossover", action="store_true",
         help="report, per attention replacement, the token count from which it beats SDPA")
    _add(p, "--sweep", type=int, nargs=2, metavar=("MIN", "MAX"),
         help="--crossover token range, powers of two (default: 256 16384 on a GPU, 64 1024 on a CPU)")
    _add(p, "--model", metavar="MODEL",
         help="time the operators at the shapes matched in this model (a preset such as DiT-XL/2, "
              "a checkpoint, or diffusers:dit/diffusers:pixart); needs --rules")
    _add(p, "--rules", metavar="FILE",
         help="with --model: the rule file whose selected regions are timed "
              "(a path or a bundled name, e.g. dit-xl2-mha-swa-50p.toml)")
    _add(p, "--kernels", action="store_true",
         help="kernel-level table: each kernel core alone vs flex_attention/SDPA/torch/fla/"
              "mamba_ssm/F.conv1d/causal_conv1d, output-checked, with the targets as ratios "
              "(exit 1 when a graftfx kernel fails its check)")
    _add(p, "--quick", action="store_true",
         help="with --kernels: one small shape per kernel (CPU: L=256; GPU: L=4096)")
    _add(p, "--kernel", action="append", metavar="FAMILY",
         help="with --kernels: only these kernel families (repeat or comma-separate; "
              "default: all)")
    _add(p, "--cuda-graphs", action="store_true",
         help="with --kernels on CUDA: time small cases (fwd moving <= 256 MiB) as CUDA graph replays")
    _add(p, "--budget-s", type=float, metavar="S",
         help="with --kernels: start no new timing after S seconds (the rest are marked skipped)")
    _add(p, "--json", metavar="PATH", help="also write every row and the header facts to this JSON file")
    _add(p, "--warmup-ms", type=float, default=25.0, metavar="MS",
         help="warm-up time per timing in ms (default: 25)")
    _add(p, "--rep-ms", type=float, default=100.0, metavar="MS",
         help="measured time per timing in ms; at least 3 calls on a CPU (default: 100)")


def command_line(args) -> str:
    """The command as typed; rebuilt from the options (less defaults) if that is unknown."""
    parts = ["graftfx", "bench"]
    if getattr(args, "bench_argv", None) is not None:
        return shlex.join(parts + args.bench_argv)
    for dest, flag, default in _FLAGS:
        value = getattr(args, dest, default)
        if value == default or value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        elif isinstance(value, list) and dest in ("op", "shape", "kernel"):
            for v in value:
                parts += [flag, str(v)]
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(parts)


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _groups(text: str | None, cuda: bool) -> set[str]:
    from .cases import PATH_GROUPS

    if text is None:
        return set(PATH_GROUPS) if cuda else {"reference"}
    chosen = {"reference" if g == "eager" else g for g in _split([text]) or []}
    bad = sorted(chosen - set(PATH_GROUPS))
    if bad or not chosen:
        raise GraftError(f"--paths {text!r}: unknown path group {bad[0] if bad else '(none)'!r}; "
                         f"choose from {', '.join(PATH_GROUPS)} (comma-separated)")
    return chosen


def _check_kernels(args) -> None:
    if not args.kernels:
        given = [f for f, v in (("--quick", args.quick), ("--kernel", args.kernel),
                                ("--cuda-graphs", args.cuda_graphs),
                                ("--budget-s", args.budget_s is not None)) if v]
        if given:
            raise GraftError(f"{given[0]}: only applies with --kernels; add --kernels or drop {given[0]}")
        return
    given = [f for f, v in (("--op", args.op), ("--shape", args.shape), ("--tokens", args.tokens),
                            ("--dim", args.dim), ("--heads", args.heads), ("--full", args.full),
                            ("--paths", args.paths), ("--crossover", args.crossover),
                            ("--sweep", args.sweep), ("--model", args.model), ("--rules", args.rules))
             if v]
    if given:
        raise GraftError(f"{given[0]} does not apply with --kernels: the kernel table fixes its "
                         f"shapes and paths (use --quick, --kernel, --batch, --dtype); drop {given[0]}")
    if args.budget_s is not None and not args.budget_s > 0:
        raise GraftError(f"--budget-s {args.budget_s:g} must be a positive number of seconds")


def _check(args) -> None:
    _check_kernels(args)
    if args.model and not args.rules:
        raise GraftError(f"--model {args.model}: needs --rules FILE naming the regions to time "
                         f"(e.g. --rules dit-xl2-mha-swa-50p.toml)")
    if args.rules and not args.model:
        raise GraftError("--rules: needs --model MODEL to match against (e.g. --model DiT-XL/2)")
    if args.model:
        given = [f for f, v in (("--op", args.op), ("--shape", args.shape), ("--tokens", args.tokens),
                                ("--dim", args.dim), ("--heads", args.heads), ("--crossover", args.crossover))
                 if v]
        if given:
            raise GraftError(f"{given[0]} does not apply with --model: the model and its rules fix "
                             f"the operators and shapes; drop {given[0]}")
    if args.crossover and args.paths:
        raise GraftError("--paths does not apply with --crossover: the sweep times each operator's "
                         "deployed path (triton on a GPU, reference on a CPU); drop --paths")
    if args.sweep and not args.crossover:
        raise GraftError("--sweep: only applies with --crossover; add --crossover or drop --sweep")
    if args.warmup_ms < 0 or args.rep_ms <= 0:
        raise GraftError(f"--warmup-ms {args.warmup_ms:g} / --rep-ms {args.rep_ms:g}: "
                         f"need warm-up >= 0 and rep > 0 milliseconds")
    if args.batch is not None and args.batch < 1:
        raise GraftError(f"--batch {args.batch} must be a positive integer")
    if args.threads is not None and args.threads < 1:
        raise GraftError(f"--threads {args.threads} must be a positive integer")


@dataclass
class Job:
    """One kind of run: its title, dtype, progress length and body (each given the Bench)."""

    title: str
    dtype: object                    # torch.dtype of the run (the ceilings use it)
    units: Callable                  # (bench) -> timings to expect
    run: Callable                    # (bench) -> (rows, extra: crossover summaries / model totals)


def _model_job(args, cuda: bool, notes: list[str]) -> Job:
    from .cases import DTYPES, OpCase
    from .model import default_dtype, model_groups, run_model
    from .runner import count_units

    dtype = args.dtype or default_dtype("cuda" if cuda else "cpu")
    if dtype not in DTYPES:
        raise GraftError(f"--dtype {dtype!r} is not supported; choose from {', '.join(DTYPES)}")
    batch = args.batch or (8 if cuda else 1)
    if not cuda and args.batch is None:
        notes.append("CPU: batch 1 (pass --batch to change)")
    found, model_notes = model_groups(args.model, args.rules)
    notes += model_notes

    def units(bench):
        return sum(count_units([OpCase(g.rule.operator, dict(g.rule.options), g.region.kind)], 1, bench)
                   for g in found)

    def run(bench):
        return run_model(found, batch, dtype, bench)
    return Job(f"{args.model} with {args.rules}", DTYPES[dtype], units, run)


def _ops_job(args, device, notes: list[str]) -> Job:
    from . import crossover as xo
    from .cases import ATTENTION, BASELINES, operator_cases, resolve_shapes
    from .runner import count_units, run_ops

    cuda = device.type == "cuda"
    cases, case_notes = operator_cases(_split(args.op))
    shapes, shape_notes = resolve_shapes(_split(args.shape), device, batch=args.batch,
                                         tokens=args.tokens, dim=args.dim, heads=args.heads,
                                         dtype=args.dtype, full=args.full)
    notes += case_notes + shape_notes
    if not args.crossover:
        return Job("operator timings", shapes[0].torch_dtype,
                   lambda bench: count_units(cases, len(shapes), bench),
                   lambda bench: (run_ops(cases, shapes, bench), None))
    lo, hi = args.sweep or (xo.GPU_SWEEP if cuda else xo.CPU_SWEEP)
    lengths = xo.sweep_lengths(lo, hi)
    if not cuda and not args.sweep:
        notes.append(f"CPU: crossover sweep shortened to L = {lo}..{hi} (a GPU sweeps "
                     f"{xo.GPU_SWEEP[0]}..{xo.GPU_SWEEP[1]}); pass --sweep to change")
    if args.tokens:
        notes.append("--tokens is ignored by --crossover: the sweep sets L")
    shape = shapes[0]
    if len(shapes) > 1:
        notes.append(f"crossover at the batch/width/heads of {shape.name} only")
    swept = xo.crossover_cases(cases)
    if not swept:
        raise GraftError("--crossover: none of the chosen operators replaces attention "
                         f"({BASELINES[ATTENTION].op} is the baseline itself); pick attention "
                         "replacements with --op")
    title = f"crossover vs SDPA, {shape.name} B{shape.batch} D{shape.dim} H{shape.heads} {shape.dtype}"
    return Job(title, shape.torch_dtype,
               lambda bench: len(lengths) * (len(swept) + 1) * len(bench.passes),
               lambda bench: xo.run_crossover(swept, shape, lengths, bench))


def cmd(args) -> int:
    from tqdm import tqdm

    from .harness import environment, measure_ceilings, resolve_device
    from .report import GPU_NOTE, crossover_table, header, results_table, totals_text, write_json
    from .runner import PASSES, Bench, TimerSettings

    _check(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.kernels:
        return _kernels_cmd(args, device)
    groups = _groups(args.paths, cuda)
    timer = TimerSettings(args.warmup_ms, args.rep_ms)
    notes = [] if cuda else [GPU_NOTE]
    job = _model_job(args, cuda, notes) if args.model else _ops_job(args, device, notes)

    meta = environment(device, command_line(args))
    meta["timer"] = (f"triton.testing.do_bench median (warmup {timer.warmup_ms:g} ms, rep "
                     f"{timer.rep_ms:g} ms, L2 flushed per call)" if cuda else
                     f"median of per-call wall times (time.perf_counter; warmup "
                     f"{timer.warmup_ms:g} ms, rep {timer.rep_ms:g} ms, >= 3 calls)")
    meta["ceilings"] = measure_ceilings(device, job.dtype, warmup_ms=timer.warmup_ms,
                                        rep_ms=timer.rep_ms)
    with tqdm(desc="bench", unit="timing", leave=False, disable=None) as bar:
        bench = Bench(device, timer, meta["ceilings"], ("fwd",) if args.forward_only else PASSES,
                      groups, progress=bar)
        bar.total = job.units(bench)
        rows, extra = job.run(bench)
    meta["ceilings"] = meta["ceilings"].as_dict()
    meta["notes"] = notes

    print(header(meta, job.title))
    print()
    payload: dict = {"meta": meta}
    if args.crossover:
        print(crossover_table(extra))
        payload["crossover"] = extra
    elif args.model:
        print(results_table(rows, with_regions=True))
        print()
        print(totals_text(extra))
        payload["model"] = {"model": args.model, "rules": args.rules, "totals": extra}
    else:
        print(results_table(rows))
    payload["results"] = [r.as_dict() for r in rows]
    if args.json:
        print(f"\nwrote {write_json(args.json, payload)}")
    failed = [r for r in rows if r.status.startswith("failed")]
    if failed:
        print(f"graftfx bench: {len(failed)} timing(s) failed; see the ms column", file=sys.stderr)
        return 1
    return 0


class _NoBar:
    """Stands in for tqdm where it is not installed: counts nothing, prints nothing."""

    total = 0

    def __init__(self, *a, **kw):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass


def _kernels_cmd(args, device) -> int:
    """``graftfx bench --kernels``: the kernel-level table and the targets (``kernels``)."""
    try:
        from tqdm import tqdm
    except ImportError:                 # a bare GPU machine's python3 (benchmarks/gpu_check.sh)
        tqdm = _NoBar
    from . import kernels as kb
    from .cases import DTYPES
    from .harness import environment, measure_ceilings
    from .report import header, kernel_table, targets_text, write_json
    from .runner import PASSES, TimerSettings

    cuda = device.type == "cuda"
    dtype_key = args.dtype or ("bf16" if cuda else "fp32")
    if dtype_key not in DTYPES:
        raise GraftError(f"--dtype {dtype_key!r} is not supported; choose from {', '.join(DTYPES)}")
    dtype = DTYPES[dtype_key]
    families = _split(args.kernel)
    planned, notes = kb.plan(device, quick=args.quick, batch=args.batch, families=families)
    if args.cuda_graphs and not cuda:
        notes.append("--cuda-graphs: no CUDA here; timed as plain calls")
    timer = TimerSettings(args.warmup_ms, args.rep_ms)
    meta = environment(device, command_line(args))
    meta["timer"] = (f"triton.testing.do_bench median (warmup {timer.warmup_ms:g} ms, rep "
                     f"{timer.rep_ms:g} ms, L2 flushed per call)" if cuda else
                     f"median of per-call wall times (time.perf_counter; warmup "
                     f"{timer.warmup_ms:g} ms, rep {timer.rep_ms:g} ms, >= 3 calls)")
    ceilings = measure_ceilings(device, dtype, warmup_ms=timer.warmup_ms, rep_ms=timer.rep_ms)
    interpreter = {} if cuda else kb.interpreter_checks(families)
    passes = ("fwd",) if args.forward_only else PASSES
    with tqdm(desc="bench --kernels", unit="timing", leave=False, disable=None) as bar:
        bench = kb.KernelBench(device, dtype, timer, passes, graphs=args.cuda_graphs,
                               budget_s=args.budget_s, progress=bar, interpreter=interpreter)
        bar.total = bench.units(planned)
        rows = bench.run(planned)
    goals = kb.targets(rows, ceilings, cuda)
    meta["ceilings"] = ceilings.as_dict()
    meta["notes"] = notes
    models = [f"counts ({kb.TITLES[f]}): {kb.COUNTS[f]}" for f in kb.FAMILIES
              if any(r.kernel == f for r in rows)]
    models += [kb.DENSE_COUNT,
               "GB/s and TFLOP/s of every path come from the kernel's own counts (useful work): "
               "dense and masked paths do more work than they are credited with",
               f"check: relative error (||path - ref|| / ||ref||) of the output and every input "
               f"gradient against the fp32 reference (naive.py) on its slice, before timing; "
               f"tolerance {', '.join(f'{k} {v:.0e}' for k, v in kb.TOL.items())} (gradients 2x); "
               f"a path that fails is not timed"]
    title = "kernel timings" + (f" ({kb.CPU_NOTE})" if not cuda else "")
    print(header(meta, title, models))
    print()
    print(kernel_table(rows))
    print()
    print("Targets:")
    print(targets_text(goals))
    payload = {"meta": meta, "kernels": [r.as_dict() for r in rows], "targets": goals}
    if args.json:
        print(f"\nwrote {write_json(args.json, payload)}")
    failed = [r for r in rows if r.status.startswith("failed")]
    mine = [r for r in failed if r.role == kb.KERNEL]
    if failed:
        print(f"graftfx bench --kernels: {len(mine)} graftfx kernel row(s) and "
              f"{len(failed) - len(mine)} other row(s) failed (a check or a run); see the check "
              f"and ms columns", file=sys.stderr)
    return 1 if mine else 0


def register(commands: dict, arg_builders: dict) -> None:
    commands["bench"] = (cmd, HELP, DESCRIPTION)
    arg_builders["bench"] = build
