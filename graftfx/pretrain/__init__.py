"""Pretraining graftfx's own small DiTs: ``graftfx pretrain digits`` and the bundled result."""
from .bundled import BUNDLED_DIGITS_DIT, bundled_digits_config, load_bundled_digits_dit
from .train import TrainResult, TrainSettings, train_digits

__all__ = ["train_digits", "TrainSettings", "TrainResult", "load_bundled_digits_dit", "bundled_digits_config",
           "BUNDLED_DIGITS_DIT"]
