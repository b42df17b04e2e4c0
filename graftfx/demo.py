"""``graftfx demo``: the main job on the bundled pretrained digits DiT, end to end.

trace -> show the matched regions -> graft (default: attention -> Hyena-X on the paper's 50%
layers) -> cache teacher activations -> stage 1 -> short stage 2 -> evaluate the teacher, the
grafted model before distillation and after -> a report folder (report.md, report.html, the
sample grid, loss curves, timings) and a summary table on the terminal.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graftfx.match.cost import count_params

DEFAULT_RULES = "digits-mha-hyena_x-50p.toml"


@dataclass
class DemoSettings:
    rules: str = DEFAULT_RULES
    samples: int = 512            # calibration samples for the teacher cache
    steps1: int = 400
    steps2: int = 100
    batch2: int = 16
    eval_per_class: int = 20      # Digits-FID samples per class
    eval_steps: str = "ddim10"
    cfg_scale: float = 1.5
    seed: int = 0
    timings: dict = field(default_factory=dict)


def _latency_ms(model, inputs) -> float:
    """Median forward time in ms (graftfx.bench's timer; do_bench on a GPU)."""
    from graftfx.bench.harness import time_callable

    with torch.no_grad():
        return time_callable(lambda: model(*inputs), inputs[0].device).ms


def run_demo(out="runs/demo", settings: DemoSettings | None = None, progress: bool = True) -> dict:
    import graftfx
    from graftfx.distill import DistillSettings, Stage1Config, Stage2Config, distill_plan, load_data
    from graftfx.eval import evaluate, sample_per_class, save_comparison
    from graftfx.inspect import inspect
    from graftfx.models import BUNDLED_DIGITS_DIT, load_bundled_digits_dit

    s = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    clock = {}

    def phase(name):
        clock[name] = time.perf_counter()
        print(f"\n== {name}")

    def done(name):
        clock[name] = time.perf_counter() - clock[name]

    phase("load + trace + match")
    teacher = load_bundled_digits_dit()
    inputs = teacher.example_inputs(16)
    rules = graftfx.load_rules(s.rules)
    traced = graftfx.trace(teacher, teacher.example_inputs(2))     # the one trace: inspect, graft, distill
    report = inspect(traced, rules, name="digits DiT (bundled)")
    print(report.text())
    report.write(out / "inspect")
    done("load + trace + match")

    phase("graft (before distillation)")
    plan = graftfx.select(traced, rules)
    torch.manual_seed(s.seed)
    before = graftfx.splice(plan)
    done("graft (before distillation)")

    phase("teacher cache + stage 1 + stage 2")
    latents, labels = load_data("digits")
    torch.manual_seed(s.seed)                                       # the same initial weights as `before`
    settings = DistillSettings(stage="both", samples=s.samples, shard_size=256,
                               stage1=Stage1Config(steps=s.steps1, batch_size=8, seed=s.seed, ckpt_every=100),
                               stage2=Stage2Config(steps=s.steps2, batch_size=s.batch2, seed=s.seed, ckpt_every=50,
                                                   warmup=10, num_classes=teacher.config.num_classes))
    result = distill_plan(plan, latents, labels, out / "distill", settings,
                          model_id=f"bundled:{BUNDLED_DIGITS_DIT.name}", progress=progress)
    after = result.grafted
    done("teacher cache + stage 1 + stage 2")

    phase("evaluate")
    models = {"teacher": teacher, "grafted, before distillation": before, "grafted, after distillation": after}
    rows = []
    for name, model in models.items():
        rec = evaluate(model, n_per_class=s.eval_per_class, steps=s.eval_steps, cfg_scale=s.cfg_scale, sampler="ddim",
                       seed=s.seed, config=teacher.config, progress=progress)
        rows.append({"model": name, "fid": rec.fid, "accuracy": rec.accuracy,
                     "params": count_params(model), "latency_ms": _latency_ms(model, inputs),
                     "record": rec.to_dict()})
    grid = {name: sample_per_class(m, 1, steps=s.eval_steps, cfg_scale=s.cfg_scale, sampler="ddim", seed=s.seed + 7,
                                   config=teacher.config, progress=False)[0] for name, m in models.items()}
    save_comparison(grid, out / "samples.png", title="same noise and labels (one digit per column)",
                    columns=[str(i) for i in range(10)])
    done("evaluate")

    clock["total"] = time.perf_counter() - t_all
    s.timings = clock
    write_report(out, s, report, rows, result)
    print("\n" + summary_table(rows))
    print(f"\nreport: {out / 'report.html'}  ({clock['total']:.0f}s)")
    return {"rows": rows, "out": out, "timings": clock}


def summary_table(rows) -> str:
    lines = ["| model | Digits-FID | class accuracy | params | CPU latency (batch 16) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['fid']:.3f} | {r['accuracy']:.3f} | {r['params'] / 1e6:.3f}M | "
                     f"{r['latency_ms']:.1f} ms |")
    return "\n".join(lines)


def write_report(out: Path, s: DemoSettings, report, rows, result) -> None:
    from graftfx.io import atomic_write_text as atomic_write

    rec = rows[0]["record"]
    sampler = f"{rec['sampler']} sampler, {rec['steps']} steps, CFG {rec['cfg_scale']}, seed {rec['seed']}, " \
              f"{rec['n']} samples ({rec['n_per_class']} per class), reference: the real digits ({rec['reference']})"
    timing = "\n".join(f"| {k} | {v:.1f} s |" for k, v in s.timings.items())
    regions = "\n".join(f"| {r.path} | {r.kind} | {r.operator or ''} | {'yes' if r.selected else ''} |" for r in report.rows)
    md = f"""# graftfx demo: the bundled digits DiT, grafted

Rules: `{s.rules}`. Calibration samples: {s.samples}; stage 1: {s.steps1} steps; stage 2: {s.steps2} steps
(batch {s.batch2}). Evaluation: Digits-FID and class accuracy with the committed digits classifier; {sampler}.

## Results

{summary_table(rows)}

![samples](samples.png)

Rows: teacher, grafted before distillation, grafted after distillation (same noise and labels).

## Loss curves

![stage 1](distill/stage1/stage1-loss.png)
![stage 2](distill/stage2/stage2-loss.png)

## Regions

| path | kind | operator | selected |
|---|---|---|---|
{regions}

## Timings

| phase | seconds |
|---|---|
{timing}

The grafted model is exported in `distill/grafted/` (model.safetensors + graft.json); the graph
inspection (table, diff, before/after SVG) is in `inspect/report.html`.
"""
    atomic_write(out / "report.md", md)
    atomic_write(out / "report.html", _html(md))


def _html(md: str) -> str:
    """A small self-contained rendering of the report's markdown (tables, images, headings)."""
    body, table = [], []

    def flush():
        if table:
            cells = [[c.strip() for c in row.strip("|").split("|")] for row in table if not set(row) <= set("|-: ")]
            head, rest = cells[0], cells[1:]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            body.append(f'<img src="{html.escape(src)}" style="max-width:640px">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:Helvetica,Arial,sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>graftfx demo</title><style>{style}</style></head><body>" \
           + "\n".join(body) + "</body></html>"


def register(commands: dict, arg_builders: dict) -> None:
    def cmd(args) -> int:
        s = DemoSettings(rules=args.rules, samples=args.samples, steps1=args.steps1, steps2=args.steps2,
                         eval_per_class=args.eval_per_class, eval_steps=args.eval_steps, seed=args.seed)
        run_demo(args.out, s, progress=not args.no_progress)
        return 0

    def build(p):
        d = DemoSettings()
        p.add_argument("--out", default="runs/demo", help="report folder (default: %(default)s)")
        p.add_argument("--rules", default=d.rules, help="rule file (default: %(default)s)")
        p.add_argument("--samples", type=int, default=d.samples, help="teacher calibration samples (default: %(default)s)")
        p.add_argument("--steps1", type=int, default=d.steps1, help="stage 1 steps (default: %(default)s)")
        p.add_argument("--steps2", type=int, default=d.steps2, help="stage 2 steps (default: %(default)s)")
        p.add_argument("--eval-per-class", type=int, default=d.eval_per_class,
                       help="Digits-FID samples per class (default: %(default)s)")
        p.add_argument("--eval-steps", default=d.eval_steps, help="sampler steps, e.g. ddim10 or 250 (default: %(default)s)")
        p.add_argument("--seed", type=int, default=d.seed, help="seed (default: %(default)s)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    commands["demo"] = (cmd, "the main job on the bundled digits DiT: graft, distill, evaluate, report",
                        "On the bundled pretrained digits DiT: trace, show the matched regions, graft with the "
                        "default rules (attention -> Hyena-X on the paper's 50% layers), cache teacher activations, "
                        "stage 1, a short stage 2, evaluate teacher / grafted before / grafted after (Digits-FID, "
                        "class accuracy, latency), and write report.md + report.html with the sample grid, loss "
                        "curves and timings.")
    arg_builders["demo"] = build
