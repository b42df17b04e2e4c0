"""Crossover: the token count from which an attention replacement beats SDPA attention.

For each attention-replacing operator, sweep L over powers of two, time the operator's path
(``triton`` on a GPU; on a CPU the PyTorch ``reference``, or ``eager`` for operators without
kernels) and the SDPA baseline (the ``mha`` operator: projections + scaled_dot_product_attention)
at the same batch, width and heads, and report the smallest swept L from which the operator
is faster at every larger swept L, with a log-log interpolation of where the speed-up crosses 1.
"""
from __future__ import annotations

import dataclasses
import math

from graftfx.errors import GraftError

from .cases import ATTENTION, OpCase, Shape, base_path, is_baseline, make_region
from .runner import Bench, Result, release_memory

GPU_SWEEP = (256, 16384)
CPU_SWEEP = (64, 1024)


def _power_of_two(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def sweep_lengths(lo: int, hi: int) -> list[int]:
    """Powers of two from ``lo`` to ``hi`` inclusive."""
    if not (_power_of_two(lo) and _power_of_two(hi)) or lo > hi:
        raise GraftError(f"--sweep {lo} {hi}: give two powers of two, smallest first "
                         f"(e.g. --sweep 256 16384)")
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return out


def crossover_point(points: list[tuple[int, float | None]]) -> dict:
    """From (tokens, speed-up over SDPA) pairs in increasing tokens: the first swept L from
    which every later point is faster (speed-up > 1), and the interpolated crossing."""
    valid = [(n, s) for n, s in points if s is not None and s > 0]
    if not valid:
        return {"tokens": None, "estimate": None, "text": "no timings"}
    first = None
    for i in range(len(valid) - 1, -1, -1):
        if valid[i][1] <= 1.0:
            break
        first = i
    lo, hi = valid[0][0], valid[-1][0]
    if first is None:
        return {"tokens": None, "estimate": None, "text": f"SDPA faster up to {hi}"}
    if first == 0:
        return {"tokens": lo, "estimate": None, "text": f"faster from {lo} (whole sweep)"}
    (n0, s0), (n1, s1) = valid[first - 1], valid[first]
    t = -math.log(s0) / (math.log(s1) - math.log(s0)) if s1 != s0 else 1.0
    estimate = 2 ** (math.log2(n0) + t * (math.log2(n1) - math.log2(n0)))
    return {"tokens": n1, "estimate": estimate, "text": f"~{estimate:,.0f} (between {n0} and {n1})"}


def crossover_path(case: OpCase, device) -> str:
    """The path an operator is deployed on: ``triton`` on a GPU when its core runs graftfx
    kernels, else its PyTorch path (``reference``, or ``eager`` for plain-PyTorch cores)."""
    if case.operator.has_reference() and device.type == "cuda":
        return "triton"
    return base_path(case.operator)


def crossover_cases(cases: list[OpCase]) -> list[OpCase]:
    """Attention replacements only (MLP replacements are compared with the MLP; the SDPA
    baseline's operator is the baseline itself)."""
    return [c for c in cases if c.kind == ATTENTION and not is_baseline(c)]


def run_crossover(cases: list[OpCase], shape: Shape, lengths: list[int],
                  bench: Bench) -> tuple[list[Result], list[dict]]:
    """Returns (every timed row, one summary per operator and pass)."""
    cases = crossover_cases(cases)
    rows: list[Result] = []
    table: dict[tuple[str, str], dict] = {}
    for n in lengths:
        s = dataclasses.replace(shape, tokens=n)
        x = bench.input(s)
        region = make_region(ATTENTION, s, bench.device)
        base = bench.baseline(ATTENTION, region, s, s.name, x)
        rows += base.values()
        for case in cases:
            path = crossover_path(case, bench.device)
            case_rows = bench.case(case, region, s, s.name, x, base, paths=(path,))
            rows += case_rows
            # one point per pass; an operator that cannot be built at this L (a 2D operator at
            # a non-square token count) gives one skipped row, which stands for every pass
            skipped = next((r for r in case_rows if r.path == "-"), None)
            for p in bench.passes:
                r = skipped or next((r for r in case_rows if r.pass_ == p), None)
                if r is None:
                    continue
                entry = table.setdefault((case.label, p), {
                    "op": case.label, "path": path, "pass": p, "points": []})
                b = base.get(p)
                entry["points"].append({"tokens": n, "ms": r.ms, "status": r.status,
                                        "sdpa_ms": b.ms if b is not None and b.ok else None,
                                        "speedup": r.speedup})
        region = x = None
        release_memory(bench.device)
    summaries = []
    for entry in table.values():
        entry["crossover"] = crossover_point([(p["tokens"], p["speedup"]) for p in entry["points"]])
        summaries.append(entry)
    return rows, summaries
