"""Digits-FID and class accuracy for 8x8 digit samples, through the committed classifier.

Digits-FID is the Frechet distance between Gaussian fits of the classifier's penultimate
features (64 dims) of the samples and of a reference set. The default reference is the
**full real set** (all 1,797 scikit-learn digits, both splits): the most samples, so the least
noisy reference fit. Note the classifier was trained on the train split, so train images sit a
little closer to the reference than unseen images would; ``reference="test"`` uses the 359
held-out images only. Like every FID, the value is biased upward for small sample counts:
compare numbers only at the same ``n``.
"""
from __future__ import annotations

import functools

import torch

from graftfx.errors import GraftError

from .classifier import DigitClassifier, default_classifier
from .frechet import GaussianStats, gaussian_stats, stats_distance

REFERENCES = ("full", "train", "test")


def _check_images(samples, what: str = "samples") -> torch.Tensor:
    if not isinstance(samples, torch.Tensor):
        samples = torch.as_tensor(samples)
    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 8, 8):
        raise GraftError(f"{what} have shape {tuple(samples.shape)}: digits metrics need (N, 1, 8, 8) images in "
                         "[-1, 1]; pass the digits DiT's samples")
    if samples.shape[0] == 0:
        raise GraftError(f"{what} are empty: pass at least one image")
    if not torch.isfinite(samples).all():
        raise GraftError(f"{what} contain NaN or inf: the generator diverged; check the model and sampler")
    return samples.float()


def digits_features(samples, classifier: DigitClassifier | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate classifier features (N, 64) of images (N, 1, 8, 8) in [-1, 1] (float64, CPU)."""
    samples = _check_images(samples)
    model = classifier if classifier is not None else default_classifier(samples.device)
    device = next(model.parameters()).device
    feats = []
    with torch.no_grad():
        for chunk in samples.split(batch_size):
            feats.append(model.features(chunk.to(device)).double().cpu())
    return torch.cat(feats)


def _reference_images(name: str) -> torch.Tensor:
    from graftfx.data import digits_dataset, digits_split

    if name == "full":
        return digits_dataset()[0]
    (x_train, _), (x_test, _) = digits_split()
    return x_train if name == "train" else x_test


@functools.lru_cache(maxsize=8)
def _default_reference_stats(name: str) -> GaussianStats:
    return gaussian_stats(digits_features(_reference_images(name)))


def reference_stats(reference=None, classifier: DigitClassifier | None = None) -> GaussianStats:
    """Gaussian fit of the reference features.

    ``reference``: None or ``"full"`` (all 1,797 real digits), ``"train"``, ``"test"`` (the fixed
    split of ``graftfx.data.digits_split``), an image tensor (N, 1, 8, 8), or ``GaussianStats``.
    """
    if isinstance(reference, GaussianStats):
        return reference
    if reference is None or isinstance(reference, str):
        name = reference or "full"
        if name not in REFERENCES:
            raise GraftError(f"unknown digits reference {name!r}: use one of {', '.join(REFERENCES)}, "
                             "an image tensor or GaussianStats")
        if classifier is None:
            return _default_reference_stats(name)
        return gaussian_stats(digits_features(_reference_images(name), classifier))
    return gaussian_stats(digits_features(_check_images(reference, "reference images"), classifier))


def digits_fid(samples, reference=None, *, classifier: DigitClassifier | None = None) -> float:
    """Digits-FID of samples (N, 1, 8, 8) in [-1, 1] against ``reference`` (default: the full real set).

    ``classifier`` defaults to the committed one (``graftfx/assets/digits/classifier.safetensors``).
    """
    stats = gaussian_stats(digits_features(samples, classifier))
    return stats_distance(stats, reference_stats(reference, classifier))


def predict(samples, classifier: DigitClassifier | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Predicted class (N,) of each image."""
    samples = _check_images(samples)
    model = classifier if classifier is not None else default_classifier(samples.device)
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in samples.split(batch_size)])


def class_accuracy(samples, labels, *, classifier: DigitClassifier | None = None) -> float:
    """Fraction of samples the classifier assigns to the class they were generated for."""
    labels = torch.as_tensor(labels).long().cpu()
    samples = _check_images(samples)
    if labels.shape != (samples.shape[0],):
        raise GraftError(f"labels have shape {tuple(labels.shape)}: need one label per sample "
                         f"({samples.shape[0]},); pass the labels the samples were generated with")
    return float((predict(samples, classifier) == labels).double().mean())


def per_class_accuracy(samples, labels, *, classifier: DigitClassifier | None = None,
                       num_classes: int = 10) -> list[float | None]:
    """Class accuracy per requested label (None for a label with no samples)."""
    labels = torch.as_tensor(labels).long().cpu()
    hit = (predict(samples, classifier) == labels).double()
    return [float(hit[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
