"""``graftfx demo``: the main flow on a bundled model, end to end, with a report folder.

Until the bundled pretrained model lands, the demo runs trace -> match -> select -> splice ->
inspect on DiT-S/2 (random weights) with the paper's Hyena-X 50% rule, checks the grafted
model runs at other batch sizes, and writes the inspect report.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

DEFAULT_RULES = "dit-xl2-mha-hyena_x-50p.toml"


def run_demo(out: str | Path = "runs/demo", rules: str = DEFAULT_RULES, model_name: str = "DiT-S/2") -> dict:
    import graftfx
    from graftfx.inspect import inspect
    from graftfx.models.zoo import resolve_model

    out = Path(out)
    t0 = time.perf_counter()
    print(f"[1/5] building {model_name} (random weights)")
    model, args, kwargs = resolve_model(model_name, meta=False, batch=2)
    print("[2/5] tracing")
    traced = graftfx.trace(model, args, kwargs)
    print(f"      {traced.tracer} in {traced.seconds:.2f}s, {len(traced.graph.nodes)} nodes")
    print("[3/5] matching")
    for name, report in graftfx.match_all(traced).items():
        print(f"      {name:15s} {len(report.regions):3d} regions")
    print(f"[4/5] grafting with {rules}")
    plan = graftfx.select(traced, graftfx.load_rules(rules))
    grafted = graftfx.splice(plan)
    for g in grafted.grafts:
        print(f"      {g.region.path:16s} -> {g.operator}")
    with torch.no_grad():
        for batch in (1, 3):
            x = model.example_inputs(batch)
            y = grafted(*x)
            if not torch.isfinite(y).all():
                raise RuntimeError("grafted model produced NaN/inf")
            print(f"      batch {batch}: output {tuple(y.shape)} finite")
    print(f"[5/5] inspecting -> {out}/")
    report = inspect(model, plan.rules, args, kwargs, name=model_name, traced=traced)
    files = report.write(out)
    print()
    print(report.summary())
    print(f"\nreport: {files['report.html']}  ({time.perf_counter() - t0:.1f}s)")
    return {"report": report, "files": files}


def register(commands: dict, arg_builders: dict) -> None:
    def cmd(args) -> int:
        run_demo(args.out, args.rules, args.model)
        return 0

    def build(p):
        p.add_argument("--out", default="runs/demo", help="report folder (default: runs/demo)")
        p.add_argument("--rules", default=DEFAULT_RULES, help="rule file (default: %(default)s)")
        p.add_argument("--model", default="DiT-S/2", help="model spec (default: %(default)s)")

    commands["demo"] = (cmd, "run the main flow on the bundled model and write a report",
                        "Trace, match, graft and inspect the bundled model end to end; writes report.html "
                        "and friends to --out.")
    arg_builders["demo"] = build
