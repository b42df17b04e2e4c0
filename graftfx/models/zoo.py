"""Resolve a model spec (CLI's MODEL argument) to (model, example args, example kwargs).

- ``digits``: the bundled pretrained digits DiT (graftfx/assets/digits/dit.safetensors).
- ``DiT-S/2`` ... ``DiT-XL/8``: a preset; random weights, or the meta device (``meta=True``:
  nothing materialised, for inspecting big models).
- a path ending in ``.pt``, ``.pth`` or ``.safetensors``: ``load_dit``.
- ``diffusers:dit`` / ``diffusers:pixart``: small random diffusers transformers (for trying
  things without a hub), or ``diffusers:/local/folder`` holding a saved diffusers transformer.
"""
from __future__ import annotations

from pathlib import Path

import torch

from graftfx.errors import GraftError

from .bundled import load_bundled_digits_dit
from .dit import DiT_models
from .load import load_dit


def resolve_model(spec: str, *, meta: bool = False, batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    if spec in DiT_models:
        if meta:
            with torch.device("meta"):
                model = DiT_models[spec]().eval()
        else:
            model = DiT_models[spec]().eval()
        return model, model.example_inputs(batch), {}
    if spec == "digits":
        model = load_bundled_digits_dit()
        return model, model.example_inputs(batch), {}
    if spec.startswith("diffusers:"):
        return _diffusers(spec.split(":", 1)[1], batch)
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".safetensors"):
        model = load_dit(path)
        return model, model.example_inputs(batch), {}
    choices = ", ".join(list(DiT_models) + ["digits", "diffusers:dit", "diffusers:pixart", "PATH.pt", "PATH.safetensors"])
    raise GraftError(f"unknown model {spec!r}; valid: {choices}")


def small_diffusers(kind: str):
    """Small random diffusers transformers at real structure (for tests and offline demos)."""
    try:
        import diffusers
    except ImportError:
        raise GraftError("diffusers is not installed; pip install 'graftfx[diffusers]'") from None
    if kind == "dit":
        return diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1).eval()
    if kind == "pixart":
        return diffusers.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
            sample_size=8, patch_size=2, cross_attention_dim=32, caption_channels=24,
            norm_type="ada_norm_single", use_additional_conditions=False).eval()
    raise GraftError(f"unknown diffusers test model {kind!r}; valid: dit, pixart")


def diffusers_inputs(model, batch: int) -> dict:
    cfg = model.config
    size = cfg.sample_size
    kw = dict(hidden_states=torch.randn(batch, cfg.in_channels, size, size),
              timestep=torch.randint(0, 1000, (batch,)), return_dict=False)
    if type(model).__name__.startswith("PixArt"):
        kw["encoder_hidden_states"] = torch.randn(batch, 6, cfg.caption_channels)
    else:
        kw["class_labels"] = torch.randint(0, cfg.num_embeds_ada_norm, (batch,))
    return kw


def _diffusers(what: str, batch: int):
    if what in ("dit", "pixart"):
        model = small_diffusers(what)
    else:
        folder = Path(what)
        if not (folder / "config.json").is_file():
            raise GraftError(f"diffusers model folder {folder} has no config.json")
        import json

        import diffusers

        name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise GraftError(f"{folder}/config.json names class {name!r}, which diffusers does not have")
        model = cls.from_pretrained(str(folder)).eval()
    return model, (), diffusers_inputs(model, batch)
