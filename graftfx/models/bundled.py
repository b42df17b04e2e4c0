"""The committed digits DiT (``graftfx/assets/digits/dit.safetensors``), loaded strictly."""
from __future__ import annotations

from pathlib import Path

from graftfx.data import DIGITS_CONFIG
from graftfx.errors import GraftError

from .dit import DiT, DiTConfig
from .load import load_dit, stored_config

BUNDLED_DIGITS_DIT = Path(__file__).resolve().parent.parent / "assets" / "digits" / "dit.safetensors"


def bundled_digits_config(path=BUNDLED_DIGITS_DIT) -> DiTConfig:
    """The config stored in the file's metadata (``DIGITS_CONFIG`` when the file has none)."""
    return stored_config(path) or DiTConfig(**DIGITS_CONFIG)


def load_bundled_digits_dit(device="cpu", dtype=None, path=BUNDLED_DIGITS_DIT) -> DiT:
    """The bundled pretrained digits DiT (EMA weights, eval mode) through ``graftfx.models.load_dit``."""
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"bundled digits DiT {path} not found; fix: reinstall graftfx, or train one with "
                         "'graftfx pretrain digits --out DIR' and copy DIR/dit.safetensors there")
    return load_dit(path, bundled_digits_config(path), device=device, dtype=dtype)
