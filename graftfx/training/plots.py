"""Loss curves from a metrics file, saved as PNG atomically."""
from __future__ import annotations

from pathlib import Path

from graftfx.io import atomic_path
from graftfx.match.paths import short_name

from .metrics import Metrics


def plot_curves(metrics_path, png, title: str, prefix: str = "loss/") -> Path | None:
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

    from .metrics import disk_error

    try:
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png")
    except OSError as e:
        raise disk_error(e, png) from None
    finally:
        plt.close(fig)
