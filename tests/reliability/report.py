"""Markdown tables of measure.py results (the figures of docs/reliability.md).

    .venv/bin/python tests/reliability/report.py docs/reliability/before.json docs/reliability/after.json
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

COLUMNS = ("success", "clean error", "traceback", "vague error", "hang", "silently wrong", "wrongly refused",
           "data lost", "code run")
NAMES = {"rules": "rule files", "checkpoints": "checkpoint files", "manifests": "export folders (load_grafted)",
         "cli": "CLI argument lists", "faults": "injected faults (real processes)", "kernels": "kernel calls"}


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
    for f in c["findings"]:
        key = (f["kind"], f["outcome"], f["detail"].split(" | ")[0].split(" -> ")[-1][:140])
        seen[key] += 1
        example.setdefault(key, f["detail"])
    lines = [f"- {n} x [{o}] {k}: `{d}`" for (k, o, d), n in seen.most_common(limit)]
    return "\n".join(lines)


def main(argv) -> int:
    for path in argv:
        r = json.loads(Path(path).read_text())
        print(f"## {r.get('label') or path}: {r['date']}, {r['machine']}, seed {r['seed']}\n")
        print(f"`{r['command']}`\n")
        print(table(r) + "\n")
        for name in r["campaigns"]:
            k = kinds(r, name)
            if k.count("\n") > 1:
                print(f"### {NAMES.get(name, name)}: kinds with findings\n\n{k}\n\n{findings(r, name)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
