"""Markdown tables of measure.py results (the figures of docs/reliability.md).

    .venv/bin/python tests/reliability/report.py docs/reliability/before.json docs/reliability/after.json
    .venv/bin/python tests/reliability/report.py --compare docs/reliability/before.json docs/reliability/after.json

The first form: one table per file, the kinds with findings and example messages, and the
command, date and machine of every campaign. ``--compare``: one table, a row per campaign and
file (before / after side by side).
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

COLUMNS = ("success", "clean error", "traceback", "vague error", "hang", "silently wrong", "wrongly refused",
           "data lost", "code run")
NAMES = {"rules": "rule files", "checkpoints": "checkpoint files", "manifests": "export folders (load_grafted)",
         "cli": "CLI argument lists", "faults": "injected faults (real distill processes)",
         "exportdisk": "full disks during export (real processes)", "kernels": "kernel calls"}


def table(results: dict) -> str:
    head = "| campaign | inputs | " + " | ".join(COLUMNS) + " | seconds |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    total = Counter()
    for name, c in results["campaigns"].items():
        out = c["outcomes"]
        total.update(out)
        total["inputs"] += c["cases"]
        rows.append(f"| {NAMES.get(name, name)} | {c['cases']:,} | " + " | ".join(str(out.get(k, 0)) for k in COLUMNS)
                    + f" | {c.get('seconds', '')} |")
    rows.append(f"| **all** | **{total['inputs']:,}** | " + " | ".join(f"**{total.get(k, 0)}**" for k in COLUMNS)
                + " | |")
    return "\n".join(rows)


def kinds(results: dict, campaign: str, bad_only: bool = True) -> str:
    c = results["campaigns"].get(campaign)
    if not c:
        return ""
    rows = ["| kind | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for kind, out in sorted(c["by_kind"].items()):
        if bad_only and not any(out.get(k) for k in COLUMNS[2:]):
            continue
        rows.append(f"| {kind} | " + " | ".join(str(out.get(k, 0)) for k in COLUMNS) + " |")
    return "\n".join(rows)


def findings(results: dict, campaign: str, limit: int = 12) -> str:
    c = results["campaigns"].get(campaign)
    if not c:
        return ""
    seen = Counter()
    example = {}
    for f in c["findings"]:   # grouped with a count (measure.py now), or one per finding (older files)
        key = (f["kind"], f["outcome"], f["detail"].split(" | ")[0].split(" -> ")[-1][:140])
        seen[key] += f.get("count", 1)
        example.setdefault(key, f["detail"])
    lines = [f"- {n} x [{o}] {k}: `{' '.join(d.split())}`" for (k, o, d), n in seen.most_common(limit)]
    return "\n".join(lines)


def compare(paths: list[str]) -> str:
    files = [json.loads(Path(p).read_text()) for p in paths]
    head = "| campaign | measured | inputs | " + " | ".join(COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    names = []
    for r in files:
        names += [n for n in r["campaigns"] if n not in names]
    for name in names:
        for r in files:
            c = r["campaigns"].get(name)
            label = r.get("label") or "?"
            if c is None:
                rows.append(f"| {NAMES.get(name, name)} | {label}: not measured | | " + " | ".join("" for _ in COLUMNS) + " |")
                continue
            out = c["outcomes"]
            rows.append(f"| {NAMES.get(name, name)} | {label}, {c.get('date', r['date'])} | {c['cases']:,} | "
                        + " | ".join(str(out.get(k, 0)) for k in COLUMNS) + " |")
    return "\n".join(rows)


def stamps(results: dict) -> str:
    lines = []
    for name, c in results["campaigns"].items():
        lines.append(f"- {NAMES.get(name, name)}: `{c.get('command', results['command'])}` "
                     f"({c.get('date', results['date'])}; {c.get('machine', results['machine'])}; {c.get('seconds', '?')} s)")
    return "\n".join(lines)


def main(argv) -> int:
    if argv and argv[0] == "--compare":
        print(compare(argv[1:]))
        return 0
    for path in argv:
        r = json.loads(Path(path).read_text())
        print(f"## {r.get('label') or path}: {r['date']}, {r['machine']}, seed {r['seed']}\n")
        print(f"`{r['command']}`\n")
        print(table(r) + "\n")
        print("Measured by:\n\n" + stamps(r) + "\n")
        for name in r["campaigns"]:
            k = kinds(r, name)
            if k.count("\n") > 1:
                print(f"### {NAMES.get(name, name)}: kinds with findings\n\n{k}\n\n{findings(r, name)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
