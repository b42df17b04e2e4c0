"""``graftfx study STUDY.toml --out DIR``."""
from __future__ import annotations


def _study(args) -> int:
    from .study import load_study, run_study

    study = load_study(args.study)
    run_study(study, args.out, only=args.only, progress=not args.no_progress)
    print(f"\nwrote {args.out}/table.md, quality-vs-latency.png, results.json")
    return 0


def _args(p) -> None:
    p.add_argument("study", metavar="STUDY.toml", help="study file (path, or a bundled one in rewrites/studies/)")
    p.add_argument("--out", required=True, help="results folder: results.json, table.md, quality-vs-latency.png, "
                                                "cache/, runs/ (rerun to resume)")
    p.add_argument("--only", help="run only experiments whose name contains this text")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(commands: dict, arg_builders: dict) -> None:
    commands["study"] = (_study, "sweep experiments (the paper's table in miniature) on the bundled model",
                         "Run every [[experiment]] of STUDY.toml at each layer fraction: graft, stage 1 from a shared "
                         "teacher cache, a short stage 2, then Digits-FID, class accuracy, params, FLOPs and CPU "
                         "latency. Writes results.json after each run (rerun to resume), table.md in the paper's "
                         "shape and quality-vs-latency.png.")
    arg_builders["study"] = _args
