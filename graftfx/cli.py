"""The ``graftfx`` command. User errors exit 2 with one line; never a traceback from our code."""
from __future__ import annotations

import argparse
import sys
import time

from graftfx.errors import GraftError

MODEL_HELP = ("'digits' (the bundled pretrained model), a preset (DiT-S/2 ... DiT-XL/8; traced on the meta device unless --materialize), "
              "a DiT checkpoint (.pt/.pth/.safetensors, public DiT key layout), "
              "diffusers:dit / pixart / unet / hunyuan / sd3 / flux / stable_audio / FOLDER, timm:vit / swin / NAME, "
              "or transformers:vit / clip / bert / llama / FOLDER (small random models unless a FOLDER or NAME)")
RULES_HELP = "a TOML rule file (path, or the name of a bundled one in rewrites/rules/)"

COMMANDS: dict[str, tuple] = {}


class Parser(argparse.ArgumentParser):
    """argparse with the project's error policy: a usage mistake is one line and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def out_folder(value, flag: str = "--out"):
    """An output folder argument: not empty (which would write into the working folder), not an
    existing file, and not under one. Returns it as a Path (created later, by the writer)."""
    from pathlib import Path

    if value is None:
        return None
    if not str(value).strip():
        raise GraftError(f"{flag} is empty; give an output folder (an empty path would write into the current one)")
    path = Path(value)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise GraftError(f"{flag} {value}: {p} is a file, not a folder; give a folder path")
    return path


def out_file(value, flag: str):
    """An output file argument: a name, in a folder that is not a file."""
    from pathlib import Path

    if not str(value).strip():
        raise GraftError(f"{flag} is empty; give a file name")
    path = Path(value)
    if path.is_dir():
        raise GraftError(f"{flag} {value} is a folder; give a file name")
    for p in path.parents:
        if p.exists() and not p.is_dir():
            raise GraftError(f"{flag} {value}: {p} is a file, not a folder")
    return path


def check_number(flag: str, value, *, lo=None, hi=None, integer: bool = False, low_open: bool = False) -> None:
    """A numeric argument in range (finite; ``lo`` inclusive unless ``low_open``): else a GraftError
    naming the flag and the range."""
    import math

    ok = value is not None and (isinstance(value, int) or math.isfinite(value))
    if ok and lo is not None:
        ok = value > lo if low_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        kind = "an integer" if integer else "a finite number"
        span = (f" > {lo}" if low_open else f" >= {lo}") if lo is not None else ""
        span += f" and <= {hi}" if hi is not None else ""
        raise GraftError(f"{flag} {value}: must be {kind}{span}")


def command(name: str, help: str, description: str):
    def wrap(fn):
        COMMANDS[name] = (fn, help, description)
        return fn
    return wrap


def _load(args):
    from graftfx.models.zoo import resolve_model

    return resolve_model(args.model, meta=not getattr(args, "materialize", False), batch=2)


def _model_args(p: argparse.ArgumentParser, rules_required: bool = False) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--rules", metavar="FILE", required=rules_required, help=RULES_HELP)
    p.add_argument("--materialize", action="store_true",
                   help="build presets with random weights instead of on the meta device")


@command("inspect", "table of regions, graph diff, totals, SVG/HTML report",
         "Trace MODEL, list every attention and MLP region (path, kind, shapes, params, FLOPs) and, "
         "with --rules, what the rules select, the graph before/after, the totals, and a rendering of "
         "one block before and after (SVG via Graphviz's dot when installed) in a self-contained HTML report.")
def cmd_inspect(args) -> int:
    from graftfx.inspect import inspect

    out_folder(args.out)
    rules = _rules(args.rules)              # cheap checks (the rule file) before the trace
    model, ex_args, ex_kwargs = _load(args)
    if rules is not None and not all(t.is_meta for t in model.parameters()):
        _preflight(model, rules, ex_args, ex_kwargs)   # a real model: refuse huge operators before building
    report = inspect(model, rules, ex_args, ex_kwargs, name=args.model, render=args.out is not None)
    print(report.text())
    if args.out:
        files = report.write(args.out)
        print(f"\nwrote {', '.join(str(p) for p in files.values())}")
    return 0


def _inspect_args(p):
    _model_args(p)
    p.add_argument("--out", metavar="DIR", help="write report.html, regions.json, report.txt, graph.diff, "
                   "before.svg and after.svg here")


@command("explain", "why each rule matched what it did (or did not)",
         "For every rule: the regions its pattern matched and selected; where nothing or fewer regions "
         "than the model has blocks matched, the nearest candidates and the condition each one failed.")
def cmd_explain(args) -> int:
    from graftfx.inspect import explain

    rules = _rules(args.rules)              # cheap checks (the rule file) before the trace
    model, ex_args, ex_kwargs = _load(args)
    found = explain(model, rules, ex_args, ex_kwargs)
    for e in found:
        print(e)
    errors = [err for e in found for err in e.errors]
    if errors:
        more = f" (and {len(errors) - 1} more above)" if len(errors) > 1 else ""
        raise GraftError(errors[0] + more)
    return 0


def _explain_args(p):
    _model_args(p, rules_required=True)


@command("rules", "list bundled rule files, patterns and operators",
         "List the rule files bundled in rewrites/rules/, the registered region patterns and the "
         "replacement operators with the region kinds they replace and their options.")
def cmd_rules(args) -> int:
    from graftfx.registry import operators, patterns, structurals
    from graftfx.rules import builtin_rule_files, load_rules

    print("rule files:")
    for name, path in builtin_rule_files().items():
        try:
            desc = load_rules(path).description
        except GraftError as e:
            desc = f"(invalid: {e})"
        print(f"  {name:40s} {desc}")
    print("\npatterns:")
    for name, spec in patterns().items():
        print(f"  {name:18s} {spec.description}")
    print("\noperators:")
    for name, spec in operators().items():
        opts = ", ".join(spec.option_names()) or "-"
        print(f"  {name:18s} replaces {'/'.join(spec.kinds):28s} loss {spec.loss:5s} options: {opts}")
    print('\nstructural operators (pattern = "block"; docs/structural.md):')
    for name, spec in structurals().items():
        opts = ", ".join(spec.option_names()) or "-"
        print(f"  {name:18s} {spec.form:8s} loss {spec.loss:5s} options: {opts}  {spec.description}")
    return 0


def _preflight(model, rules, ex_args, ex_kwargs) -> None:
    from graftfx.api import plan
    from graftfx.export import preflight

    preflight(plan(model, rules, ex_args, ex_kwargs))


def _rules(path):
    if path is None:
        return None
    from graftfx.rules import load_rules

    return load_rules(path)


_ARGS = {"inspect": _inspect_args, "explain": _explain_args, "rules": lambda p: None}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="graftfx",
        description="Graft new operators into pretrained diffusion transformers: trace a model to an FX "
                    "graph, match attention/MLP regions with declarative rules, splice replacements, "
                    "inspect, distill, evaluate.",
        epilog="Run 'graftfx COMMAND --help' for each command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help_text, description) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=description)
        _ARGS.get(name, lambda p: None)(p)
        p.set_defaults(func=fn)
    return parser


def _register_extensions() -> None:
    """Subcommands that live in their own modules (bench, distill, demo, ...) add themselves."""
    import importlib

    for module in ("graftfx.distill.cli", "graftfx.bench.cli", "graftfx.eval.cli", "graftfx.pretrain.cli",
                   "graftfx.study.cli", "graftfx.data.cli", "graftfx.sample.cli", "graftfx.demo"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue
            raise
        mod.register(COMMANDS, _ARGS)


def main(argv=None) -> int:
    _register_extensions()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):   # no command: one line naming the choices, exit 2
        parser.error(f"no COMMAND given; choose one of {', '.join(COMMANDS)}")
    start = time.perf_counter()
    try:
        code = args.func(args)
    except GraftError as e:
        print(f"graftfx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable input, unwritable output folder, full disk
        print(f"graftfx {args.command}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"graftfx {args.command}: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "verbose", False):
        print(f"({time.perf_counter() - start:.1f}s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
