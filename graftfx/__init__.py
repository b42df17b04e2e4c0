"""graftfx: graft new operators into pretrained diffusion transformers through FX rewrites.

    model = graftfx.graft(model, "rewrites/rules/dit-xl2-mha-hyena_x-50p.toml", example_inputs)

trace -> match -> select -> splice are also callable one by one (see README).
"""
from ._layout import install as _install_layout

_install_layout()

from .errors import GraftError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["GraftError", "__version__"]
