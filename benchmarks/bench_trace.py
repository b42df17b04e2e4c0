"""Seconds to trace + match + splice DiT-XL/2 (meta device) and DiT-S/2 (real weights).

    python benchmarks/bench_trace.py [--repeat 3] [--rules dit-xl2-mha-hyena_x-50p.toml]

Target: DiT-XL/2 trace + match + splice under 3 s on the 2-core development machine.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import graftfx
from graftfx.match.walk import _PROBE_CACHE
from graftfx.models import DiT_models
from graftfx.rules import load_rules

TARGET_XL_SECONDS = 3.0


def one_run(name: str, meta: bool, rules) -> dict[str, float]:
    if meta:
        with torch.device("meta"):
            model = DiT_models[name]().eval()
    else:
        torch.manual_seed(0)
        model = DiT_models[name]().eval()
    _PROBE_CACHE.clear()  # each run pays for its own layout probes
    t0 = time.perf_counter()
    traced = graftfx.trace(model, model.example_inputs(2))
    t1 = time.perf_counter()
    for pattern in ("self_attention", "mlp"):
        graftfx.match(traced, pattern)
    t2 = time.perf_counter()
    graftfx.splice(graftfx.select(traced, rules))
    t3 = time.perf_counter()
    return {"trace": t1 - t0, "match": t2 - t1, "select+splice": t3 - t2, "total": t3 - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per model; the median is reported")
    parser.add_argument("--rules", default="dit-xl2-mlp-r6-50p.toml", help="rule file to splice with")
    args = parser.parse_args()
    rules = load_rules(args.rules)
    print(f"# bench_trace  {datetime.date.today()}  torch {torch.__version__}  {platform.processor() or platform.machine()}"
          f"  {torch.get_num_threads()} threads  rules {args.rules}")
    print("| model | weights | trace s | match s | select+splice s | total s | target |")
    print("|---|---|---|---|---|---|---|")
    for name, meta in (("DiT-XL/2", True), ("DiT-S/2", False)):
        one_run(name, meta, rules)  # warm-up: imports, first-call caches
        runs = [one_run(name, meta, rules) for _ in range(args.repeat)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        target = f"< {TARGET_XL_SECONDS:.0f} s: {'met' if med['total'] < TARGET_XL_SECONDS else 'MISSED'}" if name == "DiT-XL/2" else ""
        print(f"| {name} | {'meta' if meta else 'random'} | {med['trace']:.2f} | {med['match']:.2f} | "
              f"{med['select+splice']:.2f} | {med['total']:.2f} | {target} |")


if __name__ == "__main__":
    main()
