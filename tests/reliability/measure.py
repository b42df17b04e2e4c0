"""Run the reliability campaigns and write their figures (the numbers in docs/reliability.md).

    .venv/bin/python tests/reliability/measure.py --out docs/reliability/results.json           # full counts
    .venv/bin/python tests/reliability/measure.py --campaigns rules cli --rules 300 --cli 100   # a sample
    .venv/bin/python tests/reliability/measure.py --campaigns cli --merge docs/reliability/after.json --out docs/reliability/after.json
    .venv/bin/python tests/reliability/measure.py --compact docs/reliability/before.json   # an older file: group its findings

Every campaign record carries the command, date and machine that measured it (``--merge`` keeps
the other campaigns of an earlier file with theirs). Findings are stored grouped: a count and one
example per kind of message, at most ``_harness.EXAMPLES`` per (kind, outcome).

Campaigns: ``rules`` (generated rule files), ``checkpoints`` (DiT checkpoint files), ``manifests``
(export folders for load_grafted), ``cli`` (argument lists through ``graftfx.cli.main``),
``faults`` (SIGKILLs of real ``graftfx distill`` runs, full disks, cache corruption, concurrent runs:
see _faults.py), ``exportdisk`` (full disks during a real ``graftfx export``), ``kernels`` (random shapes and dtypes against the references: _kernels.py).
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
sys.path.insert(1, str(HERE.parent))            # tests/: _distill_job (the shared distill job)
if "--tree" in sys.argv:  # measure another copy of the code (e.g. the tree before a fix): it goes first
    TREE = str(Path(sys.argv[sys.argv.index("--tree") + 1]).resolve())
    sys.path.insert(0, TREE)
    os.environ["PYTHONPATH"] = TREE + os.pathsep + os.environ.get("PYTHONPATH", "")

import _harness as h  # noqa: E402

DEFAULTS = {"rules": 10000, "checkpoints": 1000, "manifests": 500, "cli": 2000, "kernels": 200, "faults": 1,
            "exportdisk": 4}


def compact(results: dict) -> dict:
    """Group an older results file's findings (one entry each) as Tally.to_json does now, and
    stamp each campaign with the file's command, date and machine."""
    for record in results["campaigns"].values():
        for key in ("date", "machine", "command"):
            record.setdefault(key, results[key])
        if any("count" not in f for f in record["findings"]):
            tally = h.Tally()
            for f in record["findings"]:
                tally.add(h.Result(h.Case("", f["kind"], ""), f["outcome"], f["detail"]))
            record["findings"] = tally.to_json()["findings"]
    return results


def join(files: list[dict], label: str = "") -> dict:
    out = {"label": label or files[-1].get("label", ""), "seed": files[-1]["seed"], "date": files[-1]["date"],
           "machine": files[-1]["machine"], "command": "python tests/reliability/measure.py --join ...",
           "campaigns": {}}
    for r in files:
        for name, c in r["campaigns"].items():
            a = out["campaigns"].get(name)
            if a is None or not ("--fault-parts" in a.get("command", "") and "--fault-parts" in c.get("command", "")):
                out["campaigns"][name] = json.loads(json.dumps(c))   # a later full measurement replaces an earlier one
                continue
            a["cases"] += c["cases"]
            for k, v in c["outcomes"].items():
                a["outcomes"][k] = a["outcomes"].get(k, 0) + v
            for kind, counts in c["by_kind"].items():
                mine = a["by_kind"].setdefault(kind, {})
                for k, v in counts.items():
                    mine[k] = mine.get(k, 0) + v
            a["findings"] += c["findings"]
            a["seconds"] = round(a.get("seconds", 0) + c.get("seconds", 0), 1)
            for key in ("command", "date", "machine"):
                if c.get(key) != a.get(key):
                    a[key] = f"{a.get(key)}; {c.get(key)}"
    return out


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU: kernels under TRITON_INTERPRET=1"
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__} ({gpu})"


def kernels_subprocess(out: Path, n: int, seed: int) -> tuple[dict, str]:
    """The kernels campaign in a fresh process with ``TRITON_INTERPRET=1`` in its environment:
    ``@triton.jit`` reads the variable when a kernel module is imported, and the other campaigns
    of this process have imported them already (compiled for a GPU this machine may not have)."""
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, str(HERE / "_kernels.py"), "--n", str(n), "--seed", str(seed), "--out", str(out)],
                   env=env, check=True)
    data = json.loads(out.read_text())
    return data["tally"], data["summary"]


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
    p.add_argument("--merge", help="an earlier results file: its campaigns not measured now are kept (with their "
                   "own command, date and machine)")
    p.add_argument("--fault-parts", nargs="+", default=None, help="faults campaign: only these parts "
                   "(sigkill disk corruption concurrent; default all)")
    p.add_argument("--join", nargs="+", metavar="FILE", help="write --out from these results files (no measuring): "
                   "each campaign from the last file that holds it, except a campaign measured in parts "
                   "(--fault-parts) in several files: its counts are summed and its commands listed")
    p.add_argument("--compact", metavar="FILE", help="rewrite FILE with its findings grouped (no measuring)")
    args = p.parse_args(argv)
    if args.join:
        joined = join([compact(json.loads(Path(f).read_text())) for f in args.join], args.label)
        Path(args.out).write_text(json.dumps(joined, indent=1) + "\n")
        print(f"wrote {args.out}")
        return 0
    if args.compact:
        path = Path(args.compact)
        path.write_text(json.dumps(compact(json.loads(path.read_text())), indent=1) + "\n")
        print(f"compacted {path}")
        return 0
    import resource

    # A case that asks for unbounded memory fails inside the case (a traceback) instead of the
    # whole measurement being OOM-killed (or pushing other work out): address space capped at
    # GRAFTFX_RELIABILITY_MEMORY_GB (default 8 GiB).
    limit = int(float(os.environ.get("GRAFTFX_RELIABILITY_MEMORY_GB", "8")) * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import graftfx

    results = {"label": args.label, "graftfx": str(Path(graftfx.__file__).parent), "seed": args.seed, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine(),
               "command": "python tests/reliability/measure.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "campaigns": {}}
    if args.merge and Path(args.merge).exists():
        earlier = compact(json.loads(Path(args.merge).read_text()))
        for name, record in earlier["campaigns"].items():
            if name not in args.campaigns:
                results["campaigns"][name] = record
    stamp = {k: results[k] for k in ("date", "machine", "command")}
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
            elif name == "exportdisk":
                import _faults

                tally = _faults.run_export_disks(work / "exportdisk", n, log=print)
            elif name == "faults":
                import _faults

                tally = _faults.run_all(work / "faults", full=n > 0, log=print, parts=args.fault_parts or _faults.PARTS)
            else:
                tally = None
                record, summary = kernels_subprocess(work / "kernels.json", n, args.seed)
            if tally is not None:
                record, summary = tally.to_json(), tally.summary()
            record["seconds"] = round(time.perf_counter() - start, 1)
            record.update(stamp)
            results["campaigns"][name] = record
            print(summary, flush=True)
            if args.out:  # after every campaign: a later crash keeps what was measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
