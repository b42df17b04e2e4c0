"""Pretraining graftfx's own small DiTs: ``graftfx pretrain digits`` (the bundled model itself
loads through ``graftfx.models.load_bundled_digits_dit``)."""
from .train import TrainResult, TrainSettings, train_digits

__all__ = ["train_digits", "TrainSettings", "TrainResult"]
