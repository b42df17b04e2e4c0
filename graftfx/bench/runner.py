"""Time operator cases path by path, forward and forward+backward, into result rows.

Work and traffic per row (documented in the report header and the JSON):

- FLOPs: the operator's own ``flops(tokens)`` (matmul-class FLOPs per sample, 2 per
  multiply-add) times the batch; forward+backward counts 3x the forward.
- Bytes (a compulsory-traffic model): every input, output and weight tensor touched once per
  pass, at the run's element size. Forward: read x, read W, write y. Backward adds: read dy,
  read x and W again, write dx and dW. So fwd = x + W + y and fwd+bwd = 3x + 3W + 2y.
  Intermediates (q/k/v, attention scores, conv features) are not counted, so GB/s is a lower
  bound of the traffic a path really moved.
- % of ceiling: the larger of GB/s over the measured copy bandwidth ("mem") and TFLOP/s over
  the measured matmul throughput ("mma").
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from graftfx.errors import GraftError

from .cases import BASELINES, OpCase, PathSpec, Shape, baseline_for, build, make_region, paths_for
from .harness import Ceilings, Timing, time_callable

PASSES = ("fwd", "fwd+bwd")
BYTES_MODEL = ("compulsory traffic at the run's element size: fwd = x + W + y (read input and "
               "weights, write output); fwd+bwd = 3x + 3W + 2y (adds read dy, re-read x and W, "
               "write dx and dW); intermediates not counted, so GB/s is a lower bound")
FLOPS_MODEL = ("operator.flops(tokens) x batch (matmul-class FLOPs, 2 per multiply-add); "
               "fwd+bwd = 3 x fwd")


@dataclass
class TimerSettings:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0


@dataclass
class Result:
    op: str                          # case label (operator plus options) or the baseline's name
    path: str
    kind: str
    shape: str                       # preset name (or the rule name with --model)
    batch: int
    tokens: int
    dim: int
    heads: int | None
    dtype: str
    pass_: str                       # "fwd" | "fwd+bwd"
    status: str = "ok"               # ok | skipped: why | out of memory | failed: why
    ms: float | None = None          # median
    ms_min: float | None = None
    flops: int | None = None
    bytes: int | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_ceiling: float | None = None
    bound: str | None = None         # "mem" | "mma": which ceiling pct_ceiling refers to
    baseline: str | None = None      # what speedup compares with
    speedup: float | None = None     # baseline ms / ms, same shape and pass
    regions: int = 1                 # model mode: regions sharing this shape
    where: str = ""                  # model mode: their module paths

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def bytes_moved(batch: int, tokens: int, d_in: int, d_out: int, params: int, elem: int,
                pass_: str) -> int:
    """The compulsory-traffic model (see the module notes)."""
    x, y, w = batch * tokens * d_in * elem, batch * tokens * d_out * elem, params * elem
    if pass_ == "fwd":
        return x + w + y
    if pass_ == "fwd+bwd":
        return 3 * x + 3 * w + 2 * y
    raise ValueError(f"pass must be one of {', '.join(PASSES)}, got {pass_!r}")


def fill_metrics(r: Result, ceilings: Ceilings | None) -> Result:
    if not r.ok or not r.ms:
        return r
    seconds = r.ms * 1e-3
    if r.bytes is not None:
        r.gbps = r.bytes / seconds / 1e9
    if r.flops is not None:
        r.tflops = r.flops / seconds / 1e12
    if ceilings is not None:
        fractions = {}
        if r.gbps is not None:
            fractions["mem"] = r.gbps / ceilings.gbps
        if r.tflops is not None:
            fractions["mma"] = r.tflops / ceilings.tflops
        if fractions:
            r.bound = max(fractions, key=fractions.get)
            r.pct_ceiling = 100.0 * fractions[r.bound]
    return r


@contextlib.contextmanager
def _kernel_mode(mode: str | None):
    if mode is None:
        yield
        return
    from graftfx.kernels._dispatch import kernels

    with kernels(mode):
        yield


def time_module(module: nn.Module, x: torch.Tensor, pass_: str, device: torch.device,
                timer: TimerSettings, mode: str | None = None) -> Timing:
    """Median ms of ``module(x)`` (``fwd``, under no_grad) or of ``module(x).backward(dy)``."""
    if pass_ == "fwd":
        def step():
            with torch.no_grad(), _kernel_mode(mode):
                module(x)
        return time_callable(step, device, warmup_ms=timer.warmup_ms, rep_ms=timer.rep_ms)
    xg = x.detach().clone().requires_grad_(True)
    with _kernel_mode(mode):
        dy = torch.randn_like(module(xg))
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        with _kernel_mode(mode):
            module(xg).backward(dy)
    return time_callable(step, device, warmup_ms=timer.warmup_ms, rep_ms=timer.rep_ms,
                         grad_to_none=[xg, *params])


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:limit]}"


def release_memory(device: torch.device) -> None:
    """Give the GPU memory of the last case back before the next (a CPU needs nothing)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def measure(row: Result, make, x: torch.Tensor, device: torch.device, timer: TimerSettings,
            mode: str | None = None, compiled: bool = False) -> Result:
    """Time ``make()`` into ``row``; out-of-memory and failures become the row's status."""
    try:
        if compiled:
            torch.compiler.reset()  # one fresh compile per case: no cache-limit fallbacks
        module = make()
        timing = time_module(module, x, row.pass_, device, timer, mode)
        row.ms, row.ms_min = timing.ms, timing.ms_min
    except torch.OutOfMemoryError:
        row.status = "out of memory"
    except Exception as e:  # one broken path (compile error, kernel limit) must not end the run
        if "out of memory" in str(e).lower():
            row.status = "out of memory"
        else:
            row.status = f"failed: {_one_line(e)}"
    finally:
        module = None
        release_memory(device)
    return row


def _flops(module: nn.Module, tokens: int) -> int | None:
    fn = getattr(module, "flops", None)
    try:
        return int(fn(tokens)) if callable(fn) else None
    except (ValueError, TypeError):
        return None


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _row(label, path, kind, shape: Shape, name, pass_, module=None, out_dim=None) -> Result:
    r = Result(label, path, kind, name, shape.batch, shape.tokens, shape.dim, shape.heads,
               shape.dtype, pass_)
    if module is not None:
        elem = torch.empty((), dtype=shape.torch_dtype).element_size()
        fwd = _flops(module, shape.tokens)
        r.flops = fwd * shape.batch * (1 if pass_ == "fwd" else 3) if fwd is not None else None
        r.bytes = bytes_moved(shape.batch, shape.tokens, shape.dim, out_dim or shape.dim,
                              _params(module), elem, pass_)
    return r


class Bench:
    """Runs cases at one shape against the baseline of their kind, on one device."""

    def __init__(self, device: torch.device, timer: TimerSettings, ceilings: Ceilings | None,
                 passes=PASSES, groups=("triton", "reference", "compile", "backends"), progress=None):
        self.device, self.timer, self.ceilings = device, timer, ceilings
        self.passes, self.groups, self.progress = tuple(passes), set(groups), progress

    def _tick(self, what: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(what[:40])
            self.progress.update(1)

    def input(self, shape: Shape, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape.batch, shape.tokens, shape.dim, generator=g)   # (B, L, D)
        return x.to(device=self.device, dtype=shape.torch_dtype)

    def baseline(self, kind: str, region, shape: Shape, name: str, x) -> dict[str, Result]:
        """The original region at this shape, per pass: {pass: row}."""
        rows = {}
        try:
            label, module = baseline_for(kind, region)
        except (GraftError, ValueError) as e:
            for p in self.passes:
                rows[p] = _row(BASELINES[kind].label, "eager", kind, shape, name, p)
                rows[p].status = f"skipped: {_one_line(e)}"
            return rows
        for p in self.passes:
            row = _row(label, "eager", kind, shape, name, p, module)
            rows[p] = fill_metrics(measure(row, lambda: module, x, self.device, self.timer), self.ceilings)
            self._tick(f"{label} {p}")
        return rows

    def case(self, case: OpCase, region, shape: Shape, name: str, x,
             baselines: dict[str, Result] | None, paths: tuple[str, ...] | None = None) -> list[Result]:
        """All paths x passes of ``case`` (or only the path names in ``paths``)."""
        try:
            module = build(case.op, case.options, region, case.label)
        except (GraftError, ValueError, TypeError) as e:
            row = _row(case.label, "-", case.kind, shape, name, self.passes[0])
            # the whole line: the operator's own reason comes after the rule and region
            row.status = f"skipped: {_one_line(e, limit=400)}"
            self._tick(case.label)
            return [row]
        out_dim = getattr(region, "out_width", None) or shape.dim
        rows = []
        for spec in paths_for(case, module, region, self.device, self.groups):
            if paths is not None and spec.name not in paths:
                continue
            for p in self.passes:
                rows.append(self._path(case, spec, module, shape, name, p, x, out_dim, baselines))
        return rows

    def _path(self, case, spec: PathSpec, module, shape, name, pass_, x, out_dim, baselines):
        row = _row(case.label, spec.name, case.kind, shape, name, pass_, module, out_dim)
        if spec.make is None:
            row.status = f"skipped: {spec.skip}"
        else:
            measure(row, spec.make, x, self.device, self.timer, spec.mode, spec.name == "compile")
            fill_metrics(row, self.ceilings)
        base = (baselines or {}).get(pass_)
        if base is not None:
            row.baseline = base.op
            if row.ok and base.ok and row.ms:
                row.speedup = base.ms / row.ms
        self._tick(f"{case.label} {spec.name} {pass_}")
        return row


def run_ops(cases: list[OpCase], shapes: list[Shape], bench: Bench) -> list[Result]:
    """Every case at every shape, with the baseline of each kind present first."""
    results = []
    for shape in shapes:
        x = bench.input(shape)
        for kind in dict.fromkeys(c.kind for c in cases):
            region = make_region(kind, shape, bench.device)
            base = bench.baseline(kind, region, shape, shape.name, x)
            results += base.values()
            for case in (c for c in cases if c.kind == kind):
                results += bench.case(case, region, shape, shape.name, x, base)
            region = None
            release_memory(bench.device)
    return results


def count_units(cases: list[OpCase], n_shapes: int, bench: Bench) -> int:
    """Progress-bar length: timed (path, pass) pairs, baselines included (an upper bound)."""
    per_case = 0
    for c in cases:
        operator = c.operator
        paths = (("triton" in bench.groups) and operator.has_reference()) + ("reference" in bench.groups)
        paths += ("compile" in bench.groups) + ("backends" in bench.groups) * len(operator.backends)
        per_case += max(1, paths * len(bench.passes))
    kinds = len({c.kind for c in cases})
    return n_shapes * (per_case + kinds * len(bench.passes))
