"""Model zoo: DiT presets, checkpoint loading, the bundled digits DiT, the DiT Gaussian diffusion."""
from .bundled import BUNDLED_DIGITS_DIT, bundled_digits_config, load_bundled_digits_dit
from .diffusion import GaussianDiffusion
from .dit import DiT, DiTConfig, DiT_models
from .load import infer_config, load_dit
from .zoo import resolve_model

__all__ = ["DiT", "DiTConfig", "DiT_models", "load_dit", "infer_config", "resolve_model", "GaussianDiffusion",
           "BUNDLED_DIGITS_DIT", "bundled_digits_config", "load_bundled_digits_dit"]
