"""Real FID: Inception-v3 pool features through torch-fidelity or pytorch-fid, local files only.

Same shape as Digits-FID: ``inception_fid(samples, reference, weights)`` with samples
(N, C, H, W) in [-1, 1] (C = 1 or 3; images, not latents: decode latents first), a reference
statistics file (``.npz`` with ``mu`` (2048,) and ``sigma`` (2048, 2048), e.g. ADM's
``VIRTUAL_imagenet256_labeled.npz`` or one written by ``save_reference_stats``) and the FID
Inception weights on local disk. Samples are quantised to uint8 as saved images would be, then
handed to the backend (torch-fidelity: uint8, resized inside; pytorch-fid: [0, 1] floats,
resized to 299 inside). The Frechet math is ``graftfx.eval.frechet``, shared with Digits-FID.

Nothing is downloaded at run time: when the package, the weights or the statistics are
missing, a ``GraftError`` says which and how to get them.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from pathlib import Path

import numpy as np
import torch

from graftfx.errors import GraftError

from graftfx.io import atomic_path
from .frechet import GaussianStats, gaussian_stats, stats_distance

BACKENDS = {"torch-fidelity": "torch_fidelity", "pytorch-fid": "pytorch_fid"}  # pip name -> import name
WEIGHT_FILES = {"torch-fidelity": "weights-inception-2015-12-05-6726825d.pth",
                "pytorch-fid": "pt_inception-2015-12-05-6726825d.pth"}
INSTALL_HINT = ("pip install torch-fidelity (or pytorch-fid); both need torchvision: install the torchvision "
                "build that matches your torch first, so pip does not replace torch")


def installed_backends() -> list[str]:
    """The FID packages importable here, in order of preference."""
    return [name for name, module in BACKENDS.items() if importlib.util.find_spec(module) is not None]


def load_reference_stats(path) -> GaussianStats:
    """``mu``/``sigma`` from an ``.npz`` (loaded without pickles)."""
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"reference statistics {path} not found: pass an .npz with 'mu' and 'sigma' of the real "
                         "images (e.g. ADM's VIRTUAL_imagenet256_labeled.npz), or write one with "
                         "graftfx.eval.inception_reference_stats")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise GraftError(f"reference statistics {path} lack 'mu' and/or 'sigma' (has: "
                                 f"{', '.join(data.files) or 'nothing'}); pass an .npz of Inception feature statistics")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (ValueError, OSError) as e:
        raise GraftError(f"reference statistics {path} could not be read as .npz ({e}); pass a valid .npz") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise GraftError(f"reference statistics {path} have mu {mu.shape} and sigma {sigma.shape}: need (D,) and "
                         "(D, D); regenerate them")
    return GaussianStats(mu=mu, sigma=sigma, n=0)


def save_reference_stats(stats: GaussianStats, path) -> Path:
    """Write ``mu``/``sigma`` (and ``n``) as ``.npz``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n))
    return Path(path)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 1 or 3, H, W) in [-1, 1] -> (N, 3, H, W) uint8, as the images would be saved."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise GraftError(f"images have shape {tuple(images.shape)}: real FID needs (N, 1 or 3, H, W) images in "
                         "[-1, 1]; decode latents to images first (evaluate(..., decode=vae_decode))")
    if not torch.isfinite(images).all():
        raise GraftError("images contain NaN or inf: the generator diverged; check the model and sampler")
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _check(weights, reference, backend: str, need_reference: bool = True) -> str:
    """All problems at once, in one line; returns the backend to use."""
    problems = []
    installed = installed_backends()
    if backend == "auto":
        chosen = installed[0] if installed else None
        if chosen is None:
            problems.append(f"neither torch-fidelity nor pytorch-fid is installed ({INSTALL_HINT})")
    elif backend not in BACKENDS:
        raise GraftError(f"unknown FID backend {backend!r}: use auto, {', '.join(BACKENDS)}")
    else:
        chosen = backend
        if backend not in installed:
            problems.append(f"{backend} is not installed ({INSTALL_HINT})")
    wanted = WEIGHT_FILES.get(chosen or "pytorch-fid")
    if weights is None:
        problems.append(f"no Inception weights given (pass weights=PATH to a local copy of {wanted})")
    elif not Path(weights).is_file():
        problems.append(f"Inception weights {weights} not found (download {wanted} from the package's GitHub "
                        "releases on a machine with network and pass its local path; graftfx never downloads)")
    ref_hint = ("pass an .npz with 'mu' and 'sigma', e.g. ADM's VIRTUAL_imagenet256_labeled.npz, or write one "
                "with inception_reference_stats")
    if need_reference and reference is None:
        problems.append(f"no reference statistics given ({ref_hint})")
    elif need_reference and not isinstance(reference, GaussianStats) and not Path(reference).is_file():
        problems.append(f"reference statistics {reference} not found ({ref_hint})")
    if problems:
        raise GraftError("real FID cannot run: " + "; ".join(problems))
    return chosen


def _load_extractor(backend: str, weights: Path, device):
    """A function uint8 images (N, 3, H, W) -> features (N, 2048), from the backend's Inception."""
    if backend == "torch-fidelity":
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=str(weights)).to(device).eval()
        return lambda x: net(x.to(device))[0]
    pfi = importlib.import_module("pytorch_fid.inception")

    def local(*_args, **_kwargs):  # stands in for the URL loader: only the given file is read
        return torch.load(weights, map_location="cpu", weights_only=True)

    with _patched(pfi, "load_state_dict_from_url", local):
        net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                              normalize_input=True).to(device).eval()
    return lambda x: net(x.to(device).float() / 255.0)[0].flatten(1)


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


class InceptionFeatures:
    """Inception-v3 pool features of images through an installed backend, from local weights."""

    def __init__(self, weights, *, backend: str = "auto", device="cpu", batch_size: int = 50):
        self.backend = _check(weights, None, backend, need_reference=False)
        self.weights = Path(weights)
        self.name = f"{self.backend} {self.weights.name}"
        self.batch_size = batch_size
        self._extract = _load_extractor(self.backend, self.weights, device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, 2048) float64 of images (N, 1 or 3, H, W) in [-1, 1]."""
        x = to_uint8(images)
        with torch.no_grad():
            return torch.cat([self._extract(chunk).double().cpu() for chunk in x.split(self.batch_size)])


class InceptionFID:
    """Real FID against fixed reference statistics; ``fid(images) -> float``.

    ``weights``: local FID Inception weights; ``reference``: ``.npz`` path or ``GaussianStats``;
    ``backend``: ``"auto"`` (torch-fidelity, else pytorch-fid), or one of them by name.
    """

    metric = "inception-fid"

    def __init__(self, weights, reference, *, backend: str = "auto", device="cpu", batch_size: int = 50):
        backend = _check(weights, reference, backend)  # every missing piece named at once
        self.reference = reference if isinstance(reference, GaussianStats) else load_reference_stats(reference)
        self.reference_name = "stats" if isinstance(reference, GaussianStats) else Path(reference).name
        self.features = InceptionFeatures(weights, backend=backend, device=device, batch_size=batch_size)
        self.extractor_name = self.features.name

    def __call__(self, images: torch.Tensor) -> float:
        stats = gaussian_stats(self.features(images))
        if stats.dim != self.reference.dim:
            raise GraftError(f"reference statistics have {self.reference.dim} dims but the extractor gives "
                             f"{stats.dim}: use statistics of the same Inception pool features")
        return stats_distance(stats, self.reference)


def inception_fid(samples, reference, weights, *, backend: str = "auto", device="cpu", batch_size: int = 50) -> float:
    """Real FID of samples (N, 1 or 3, H, W) in [-1, 1] against reference ``.npz`` statistics."""
    return InceptionFID(weights, reference, backend=backend, device=device, batch_size=batch_size)(samples)


def inception_reference_stats(images, weights, out=None, *, backend: str = "auto", device="cpu",
                              batch_size: int = 50) -> GaussianStats:
    """Statistics of real images (for a reference ``.npz``); written to ``out`` when given."""
    stats = gaussian_stats(InceptionFeatures(weights, backend=backend, device=device, batch_size=batch_size)(images))
    if out is not None:
        save_reference_stats(stats, out)
    return stats
