"""Calibration inputs, as in the paper: data latents noised at timesteps drawn from the model's
noise schedule (DiT: t ~ U{0..999}), with their own conditioning (class labels, or caption
embeddings + mask), no CFG.

Sample ``i`` is a pure function of (seed, i): the same seed gives the same data index,
timestep and noise for it, so the on-disk cache and the online teacher feed stage 1 the
same batches. How the model is called with them is its adapter's business
(``graftfx.models.adapters``); without one, the call is DiT's ``(x_t, t, y)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graftfx.models.adapters import ModelAdapter, NoiseSchedule, ReadyInputs


@dataclass
class CalibrationSet:
    latents: torch.Tensor          # (N, C, H, W) clean data latents
    labels: torch.Tensor | None    # (N,) class labels, or None for text-conditioned data
    samples: int                   # how many calibration samples to draw
    seed: int = 0
    num_timesteps: int = 1000
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)  # per data row: embeddings (N, S, D), mask (N, S)
    schedule: NoiseSchedule | None = None
    adapter: ModelAdapter | None = None
    model: object = None           # what the adapter builds the call for (its config)

    def __post_init__(self):
        n = len(self.latents)
        for name, t in {"labels": self.labels, **self.conditioning}.items():
            if t is not None and len(t) != n:
                raise ValueError(f"latents ({n}) and {name} ({len(t)}) differ in length")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.schedule is None:
            self.schedule = NoiseSchedule(num_timesteps=self.num_timesteps)

    def draw(self, indices) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(x_t, t, conditioning) for calibration samples ``indices``."""
        xs, ts, rows = [], [], []
        for i in indices:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            j = int(torch.randint(len(self.latents), (1,), generator=g))
            t = self.schedule.draw(g)
            noise = torch.randn(self.latents.shape[1:], generator=g)
            xs.append(self.schedule.add_noise(self.latents[j].float()[None], t, noise[None])[0])
            ts.append(t[0])
            rows.append(j)
        idx = torch.tensor(rows, dtype=torch.long)
        cond = {k: v[idx] for k, v in self.conditioning.items()}
        if self.labels is not None:
            cond["labels"] = self.labels[idx]
        return torch.stack(xs).float(), torch.stack(ts), cond

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DiT's model inputs (x_t, t, y) for calibration samples ``indices``."""
        x, t, cond = self.draw(indices)
        return x, t, cond["labels"]

    def call(self, indices) -> tuple[tuple, dict]:
        """(args, kwargs) calling the model on calibration samples ``indices``."""
        if self.adapter is None:
            return self.batch(indices), {}
        x, t, cond = self.draw(indices)
        return self.adapter.inputs(self.model, x, t, cond)


@dataclass
class ReadyCalibration:
    """Calibration samples a user prepared (``ReadyInputs``): sample i is row i mod N."""

    ready: ReadyInputs
    samples: int
    seed: int = 0

    def call(self, indices) -> tuple[tuple, dict]:
        return self.ready.call(indices)
