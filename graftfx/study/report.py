"""A study's results as the paper's table (rows: replaced -> new; columns: layer fractions) and a
quality-vs-latency plot."""
from __future__ import annotations

from pathlib import Path

from graftfx.training.plots import save_figure

COLUMNS = ("50%", "75%", "100%")


def table(results: dict, study) -> str:
    t = results.get("teacher")
    s = results["settings"]
    runs = results["runs"]
    lines = [f"# {study.description or 'graftfx study'}", ""]
    if t:
        ev = t["eval"]
        lines += [f"Teacher ({results['model']}): Digits-FID **{t['fid']:.3f}**, class accuracy {t['accuracy']:.3f}, "
                  f"{t['params'] / 1e6:.3f}M params, {t['gflops']:.3f} GFLOPs/sample, {t['latency_ms']:.1f} ms CPU "
                  f"latency (batch {s['latency_batch']}).", "",
                  f"Every number: {ev['sampler']} sampler, {ev['steps']} steps, CFG {ev['cfg_scale']}, seed {ev['seed']}, "
                  f"{ev['n']} samples ({ev['n_per_class']} per class) against the real digits; stage 1 {s['steps1']} "
                  f"steps (batch {s['batch1']}, {s['samples']} cached teacher samples), stage 2 {s['steps2']} steps "
                  f"(batch {s['batch2']}). Lower FID is better.", ""]
    names = list(dict.fromkeys(r["experiment"] for r in runs.values()))
    lines += ["## Digits-FID (class accuracy)", "",
              "| replaced -> new | " + " | ".join(COLUMNS) + " | paper 50% | paper 75% |",
              "|---|" + "---|" * (len(COLUMNS) + 2)]
    for name in names:
        cells = []
        for col in COLUMNS:
            r = runs.get(f"{name} @ {col}")
            cells.append(f"{r['fid']:.2f} ({r['accuracy']:.2f})" if r else "")
        paper = {r["fraction"]: r.get("paper_fid") for r in runs.values() if r["experiment"] == name}
        ref = [f"{paper[c]:.2f}" if paper.get(c) is not None else "" for c in ("50%", "75%")]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ref) + " |")
    lines += ["", "Paper columns: DiT-XL/2 on ImageNet 256, FID-50k (baseline 2.27), for reference only.", "",
              "## Cost", "", "| run | params | GFLOPs/sample | CPU latency ms | stage-1 loss | seconds |",
              "|---|---|---|---|---|---|"]
    for key, r in runs.items():
        loss = r.get("loss") or ""
        lines.append(f"| {key} | {r['params'] / 1e6:.3f}M | {r['gflops']:.3f} | {r['latency_ms']:.1f} | {loss} | "
                     f"{r.get('seconds', 0):.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, png: Path) -> Path | None:
    runs = results.get("runs", {})
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    markers = {"50%": "o", "75%": "s", "100%": "^"}
    names = sorted({r["experiment"] for r in runs.values()})
    colours = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    for r in runs.values():
        ax.scatter(r["latency_ms"], r["fid"], marker=markers.get(r["fraction"], "x"), color=colours[r["experiment"]],
                   s=40, edgecolor="black", linewidth=0.4)
    t = results.get("teacher")
    if t:
        ax.scatter(t["latency_ms"], t["fid"], marker="*", s=220, color="gold", edgecolor="black", zorder=5)
        ax.annotate("teacher", (t["latency_ms"], t["fid"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    for n in names:
        ax.scatter([], [], color=colours[n], label=n, s=30)
    for f, m in markers.items():
        ax.scatter([], [], marker=m, color="grey", label=f"{f} of layers", s=30)
    ax.set_yscale("log")
    ax.set_xlabel(f"CPU latency, ms (batch {results['settings']['latency_batch']})")
    ax.set_ylabel("Digits-FID (log)")
    ax.set_title("quality vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, png)
    return Path(png)
