"""What both training stages share: metrics files, plots, atomic saves, schedules, RNG state."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from graftfx.io import atomic_path, atomic_write_text
from graftfx.match.paths import short_name


class Metrics:
    """Append-only JSONL metrics; ``truncate(step)`` drops lines past a resumed step."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        keep = [line for line in self.read() if line.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier on the base lr: linear warmup, then constant or cosine to zero."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            span = max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
        return 1.0
    return f


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_curves(metrics_path: Path, png: Path, title: str, prefix: str = "loss/") -> Path | None:
    """One loss curve per key starting with ``prefix`` (log scale), from a metrics JSONL."""
    rows = Metrics(metrics_path).read()
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] == r[k] and r[k] > 0]
        if pts:
            ax.plot(*zip(*pts), label=short_name(k[len(prefix):]), linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=7, ncol=2 if len(keys) > 8 else 1)
    fig.tight_layout()
    save_figure(fig, png)
    return Path(png)


def save_figure(fig, png) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
