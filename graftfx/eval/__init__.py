"""Evaluation: Digits-FID and class accuracy (bundled digits model), real FID, sample grids.

``digits_fid`` / ``class_accuracy`` measure (N, 1, 8, 8) digit samples through the committed
classifier (``graftfx/assets/digits/classifier.safetensors``); ``evaluate`` samples a DiT and
returns an ``EvalRecord`` with the numbers and the sampler settings that made them;
``inception_fid`` / ``InceptionFID`` compute real FID through torch-fidelity or pytorch-fid from
local weights and statistics; ``save_grid`` / ``save_comparison`` write PNGs.
"""
from .classifier import DigitClassifier, default_classifier, load_classifier
from .classifier_train import train_classifier
from .digits import class_accuracy, digits_features, digits_fid, per_class_accuracy, reference_stats
from .evaluate import EvalRecord, evaluate, sample_per_class
from .frechet import GaussianStats, frechet_distance, gaussian_stats
from .grid import save_comparison, save_grid
from .inception import (InceptionFeatures, InceptionFID, inception_fid, inception_reference_stats,
                        installed_backends, load_reference_stats, save_reference_stats)

__all__ = [
    "DigitClassifier", "train_classifier", "load_classifier", "default_classifier",
    "digits_fid", "class_accuracy", "per_class_accuracy", "digits_features", "reference_stats",
    "EvalRecord", "evaluate", "sample_per_class",
    "GaussianStats", "gaussian_stats", "frechet_distance",
    "save_grid", "save_comparison",
    "InceptionFID", "InceptionFeatures", "inception_fid", "inception_reference_stats", "installed_backends",
    "load_reference_stats", "save_reference_stats",
]
