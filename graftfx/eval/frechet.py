"""Frechet distance between Gaussian fits of two feature sets (the math behind every FID here).

``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``

``tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric
positive semi-definite matrix ``S1^(1/2) S2 S1^(1/2)`` (it has the same eigenvalues as ``S1 S2``),
with ``S1^(1/2)`` from a symmetric eigen-decomposition. Everything is float64; eigenvalues below
zero (round-off of singular covariances) are clipped to zero, so no complex square root (and no
spurious imaginary part, the usual failure of ``scipy.linalg.sqrtm`` on near-singular
covariances) can arise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graftfx.errors import GraftError


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of ``n`` feature vectors, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def gaussian_stats(features) -> GaussianStats:
    """Fit a Gaussian to features (N, D): sample mean and unbiased covariance, in float64."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().to(torch.float64).numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise GraftError(f"features have shape {x.shape}: need (N, D) with N >= 2 samples; pass more samples")
    if not np.isfinite(x).all():
        raise GraftError("features contain NaN or inf: the samples are not finite; check the generator's output")
    mu = x.mean(axis=0)
    centered = x - mu
    sigma = centered.T @ centered / (x.shape[0] - 1)
    return GaussianStats(mu=mu, sigma=sigma, n=int(x.shape[0]))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigh (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S1 S2)^(1/2))`` for symmetric PSD ``S1``, ``S2`` (see the module docstring)."""
    root1 = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    m = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (>= 0)."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise GraftError(f"Gaussian statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} "
                         f"vs {sigma2.shape}; compute both with the same feature extractor")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
    return max(value, 0.0)  # round-off can leave -1e-12 for identical sets


def stats_distance(a: GaussianStats, b: GaussianStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
