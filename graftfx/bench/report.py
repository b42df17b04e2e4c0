"""Markdown tables and the JSON file of a bench run."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .cases import ATTENTION, BASELINES, MLP
from .runner import BYTES_MODEL, FLOPS_MODEL, Result

GPU_NOTE = ("NOTE: no CUDA GPU here: Triton kernel timings need a GPU. This CPU run times the "
            "PyTorch reference paths and SDPA only (median of per-call wall times).")
BASELINE_NOTE = ("speed-up = baseline ms / ms at the same shape and pass; baseline: attention "
                 f"replacements vs `{BASELINES[ATTENTION].label}` (q/k/v/out projections + "
                 f"F.scaled_dot_product_attention, the {BASELINES[ATTENTION].op} operator), MLP "
                 f"replacements vs the original MLP (the {BASELINES[MLP].op} operator, r=4)")


def header(meta: dict, title: str, models: list[str] | None = None) -> str:
    """The facts every table starts with; ``models`` replaces the operator bench's FLOP, byte
    and baseline lines (the kernel bench states its own counts)."""
    lines = [f"## graftfx bench: {title}", "",
             f"- device: {meta['device']}",
             f"- date: {meta['date']}",
             f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}",
             f"- command: `{meta['command']}`"]
    if meta.get("ceilings"):
        c = meta["ceilings"]
        lines.append(f"- measured ceilings: copy {c['gbps']:,.1f} GB/s ({c['copy_bytes'] >> 20} MiB "
                     f"read + written), matmul {c['tflops']:,.2f} TFLOP/s ({c['matmul_n']}^3 {c['dtype']})")
    lines.append(f"- timer: {meta['timer']}")
    if models is None:
        models = [f"FLOPs: {FLOPS_MODEL}", f"bytes: {BYTES_MODEL}", BASELINE_NOTE]
    lines += [f"- {m}" for m in models]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines)


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def shape_text(r: Result) -> str:
    heads = f" H{r.heads}" if r.heads else ""
    return f"{r.shape}: B{r.batch} L{r.tokens} D{r.dim}{heads}"


def results_table(rows: list[Result], with_regions: bool = False) -> str:
    cols = ["op", "path", "shape", "dtype", "pass", "ms", "GB/s", "TFLOP/s", "% of ceiling",
            "speed-up vs baseline"]
    if with_regions:
        cols.insert(3, "regions")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ms = _num(r.ms, ".3f") if r.ok else r.status
        pct = f"{r.pct_ceiling:.1f}% {r.bound}" if r.pct_ceiling is not None else ""
        speed = f"{r.speedup:.2f}x vs {r.baseline}" if r.speedup is not None else ""
        cells = [r.op, r.path, shape_text(r), r.dtype, r.pass_, ms, _num(r.gbps, ",.1f"),
                 _num(r.tflops, ",.2f"), pct, speed]
        if with_regions:
            cells.insert(3, f"{r.regions}x {r.where}")
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(out)


def _cell(point: dict) -> str:
    if point["speedup"] is not None:
        return f"{point['speedup']:.2f}x"
    status = point["status"]
    return "oom" if status == "out of memory" else status.split(":")[0] if status != "ok" else "-"


def crossover_table(summaries: list[dict]) -> str:
    if not summaries:
        return "(no attention replacement to sweep)"
    lengths = [p["tokens"] for p in summaries[0]["points"]]
    cols = ["op", "path", "pass"] + [f"L={n}" for n in lengths] + ["overtakes SDPA at L"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    sdpa: dict[str, dict[int, float | None]] = {}
    for s in summaries:
        for p in s["points"]:
            sdpa.setdefault(s["pass"], {})[p["tokens"]] = p["sdpa_ms"]
    for pass_, by_len in sdpa.items():
        cells = ["sdpa (ms)", "eager", pass_] + [_num(by_len.get(n), ".3f") for n in lengths] + [""]
        out.append("| " + " | ".join(cells) + " |")
    for s in summaries:
        by_len = {p["tokens"]: p for p in s["points"]}
        cells = [s["op"], s["path"], s["pass"]]
        cells += [_cell(by_len[n]) if n in by_len else "" for n in lengths]
        cells.append(s["crossover"]["text"])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def totals_text(totals: list[dict]) -> str:
    lines = []
    for t in totals:
        if t["speedup"] is None:
            lines.append(f"- {t['pass']}: incomplete (a path was skipped or failed)")
        else:
            lines.append(f"- {t['pass']}: selected regions {t['original_ms']:.3f} ms original -> "
                         f"{t['grafted_ms']:.3f} ms grafted ({t['speedup']:.2f}x)")
    return "\n".join(lines)


def kernel_table(rows) -> str:
    """One line per kernel-bench row (``graftfx.bench.kernels.Row``): the check before timing,
    then time, throughput from the kernel's own counts, and the ratios to the kernel."""
    cols = ["kernel", "shape", "dtype", "pass", "path", "check (rel. error)", "ms", "GB/s",
            "TFLOP/s", "kernel speed-up (baseline ms / kernel ms)"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ms = (_num(r.ms, ".3f") + (" (graph)" if r.graphed else "")) if r.ok else r.status
        if r.role == "kernel":
            ratio = f"{r.vs_best:.2f}x vs the best, {r.best}" if r.vs_best is not None else ""
        else:
            ratio = f"{r.speedup:.2f}x" if r.speedup is not None else ""
        cells = [r.kernel, f"{r.group}: {r.case}", r.dtype, r.pass_, r.path, r.check, ms,
                 _num(r.gbps, ",.1f"), _num(r.tflops, ",.2f"), ratio]
        out.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(out)


def targets_text(targets: list[dict]) -> str:
    return "\n".join(f"- {t['target']}: {t['text']}" for t in targets)


def write_json(path, payload: dict) -> Path:
    """Write ``payload`` as JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
