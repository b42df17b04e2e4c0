"""Model zoo: DiT presets, checkpoint loading, the DiT Gaussian diffusion."""
from .diffusion import GaussianDiffusion
from .dit import DiT, DiTConfig, DiT_models
from .load import infer_config, load_dit
from .zoo import resolve_model

__all__ = ["DiT", "DiTConfig", "DiT_models", "load_dit", "infer_config", "resolve_model", "GaussianDiffusion"]
