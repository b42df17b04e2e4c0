"""Model zoo: DiT presets and the DiT Gaussian diffusion."""
from .dit import DiT, DiTConfig, DiT_models

__all__ = ["DiT", "DiTConfig", "DiT_models"]
