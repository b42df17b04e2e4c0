"""Calibration inputs for a class-conditional DiT, as in the paper: data latents noised at
t ~ U{0..999} with their true labels (no CFG).

Sample ``i`` is a pure function of (seed, i): the same seed gives the same data index,
timestep and noise for it, so the on-disk cache and the online teacher feed stage 1 the
same batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graftfx.models.diffusion import GaussianDiffusion


@dataclass
class CalibrationSet:
    latents: torch.Tensor          # (N, C, H, W) clean data latents
    labels: torch.Tensor           # (N,)
    samples: int                   # how many calibration samples to draw
    seed: int = 0
    num_timesteps: int = 1000

    def __post_init__(self):
        if len(self.latents) != len(self.labels):
            raise ValueError(f"latents ({len(self.latents)}) and labels ({len(self.labels)}) differ in length")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        self._diffusion = GaussianDiffusion(num_timesteps=self.num_timesteps)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model inputs (x_t, t, y) for calibration samples ``indices``."""
        xs, ts, ys = [], [], []
        for i in indices:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            j = int(torch.randint(len(self.latents), (1,), generator=g))
            t = torch.randint(self.num_timesteps, (1,), generator=g)
            noise = torch.randn(self.latents.shape[1:], generator=g)
            x0 = self.latents[j].float()
            xs.append(self._diffusion.q_sample(x0[None], t, noise[None])[0])
            ts.append(t[0])
            ys.append(self.labels[j])
        return torch.stack(xs).float(), torch.stack(ts), torch.stack(ys)
