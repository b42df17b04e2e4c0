"""Run the reliability campaigns and write their figures (the numbers in docs/reliability.md).

    .venv/bin/python tests/reliability/measure.py --out docs/reliability/results.json           # full counts
    .venv/bin/python tests/reliability/measure.py --campaigns rules cli --rules 300 --cli 100   # a sample

Campaigns: ``rules`` (generated rule files), ``checkpoints`` (DiT checkpoint files), ``manifests``
(export folders for load_grafted), ``cli`` (argument lists through ``graftfx.cli.main``),
``faults`` (SIGKILLs of real ``graftfx distill`` runs, full disks, cache corruption, concurrent runs:
see _faults.py), ``kernels`` (random shapes and dtypes against the references: _kernels.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if "--tree" in sys.argv:  # measure another copy of the code (e.g. the tree before a fix): it goes first
    TREE = str(Path(sys.argv[sys.argv.index("--tree") + 1]).resolve())
    sys.path.insert(0, TREE)
    os.environ["PYTHONPATH"] = TREE + os.pathsep + os.environ.get("PYTHONPATH", "")

import _harness as h  # noqa: E402

DEFAULTS = {"rules": 10000, "checkpoints": 1000, "manifests": 500, "cli": 2000, "kernels": 200, "faults": 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--campaigns", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    for name, n in DEFAULTS.items():
        p.add_argument(f"--{name}", type=int, default=n, help=f"cases (default {n})")
    p.add_argument("--seed", type=int, default=h.SEED)
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--tree", help="a copy of the source tree to measure instead of the installed graftfx "
                   "(its graftfx/ needs kernels and rewrites links)")
    p.add_argument("--label", default="", help="a label stored with the results (e.g. before / after)")
    args = p.parse_args(argv)
    import resource

    # A case that asks for unbounded memory fails inside the case (a traceback) instead of the
    # whole measurement being OOM-killed (or pushing other work out): address space capped at
    # GRAFTFX_RELIABILITY_MEMORY_GB (default 8 GiB).
    limit = int(float(os.environ.get("GRAFTFX_RELIABILITY_MEMORY_GB", "8")) * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import graftfx

    results = {"label": args.label, "graftfx": str(Path(graftfx.__file__).parent), "seed": args.seed, "date": datetime.date.today().isoformat(),
               "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} (no GPU)",
               "command": "python tests/reliability/measure.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "campaigns": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.campaigns:
            start = time.perf_counter()
            n = getattr(args, name)
            print(f"== {name} ({n})", flush=True)
            if name == "rules":
                tally = h.run_rule_files(work / "rules", n, args.seed, log=print)
            elif name == "checkpoints":
                tally = h.run_checkpoints(work / "ckpt", n, args.seed)
            elif name == "manifests":
                tally = h.run_manifests(work / "manifests", n, args.seed)
            elif name == "cli":
                tally = h.run_cli(work / "cli", n, args.seed, log=print)
            elif name == "faults":
                import _faults

                tally = _faults.run_all(work / "faults", full=n > 0, log=print)
            else:
                import warnings

                import _kernels

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    tally = _kernels.run_kernels(n, args.seed, log=print)
            record = tally.to_json()
            record["seconds"] = round(time.perf_counter() - start, 1)
            results["campaigns"][name] = record
            print(tally.summary(), flush=True)
            if args.out:  # after every campaign: a later crash keeps what was measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
