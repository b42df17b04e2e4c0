"""Resolve a model spec (CLI's MODEL argument) to (model, example args, example kwargs).

- ``digits``: the bundled pretrained digits DiT (graftfx/assets/digits/dit.safetensors).
- ``DiT-S/2`` ... ``DiT-XL/8``: a preset; random weights, or the meta device (``meta=True``:
  nothing materialised, for inspecting big models).
- a path ending in ``.pt``, ``.pth`` or ``.safetensors``: ``load_dit``.
- ``diffusers:dit`` / ``pixart`` / ``unet`` / ``hunyuan`` / ``sd3`` / ``flux``: small random
  diffusers models at real structure (for trying things without a hub), or ``diffusers:/local/folder`` holding a saved diffusers transformer.
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
    choices = ", ".join(list(DiT_models) + ["digits"] + [f"diffusers:{k}" for k in DIFFUSERS_KINDS]
                        + ["diffusers:FOLDER", "PATH.pt", "PATH.safetensors"])
    raise GraftError(f"unknown model {spec!r}; valid: {choices}")


DIFFUSERS_KINDS = ("dit", "pixart", "unet", "hunyuan", "sd3", "flux")


def small_diffusers(kind: str):
    """Small random diffusers models at real structure (for tests and offline demos)."""
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
    if kind == "unet":
        return diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), mid_block_type=None,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
            attention_head_dim=8, norm_num_groups=8).eval()
    if kind == "hunyuan":
        return diffusers.HunyuanDiT2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=8,
            hidden_size=32, num_layers=4, cross_attention_dim=24, cross_attention_dim_t5=32,
            pooled_projection_dim=16, text_len=6, text_len_t5=4,
            use_style_cond_and_image_meta_size=False).eval()
    if kind == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
            pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8).eval()
    if kind == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
            axes_dims_rope=(4, 6, 6)).eval()
    raise GraftError(f"unknown diffusers test model {kind!r}; valid: {', '.join(DIFFUSERS_KINDS)}")


def small_diffusers_inputs(kind: str, batch: int, model=None) -> dict:
    """Example keyword inputs for ``small_diffusers(kind)`` at ``batch`` (seeded by the batch)."""
    g = torch.Generator().manual_seed(1000 + batch)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    steps = torch.randint(0, 1000, (batch,), generator=g)
    if kind == "dit":
        return dict(hidden_states=randn(batch, 4, 8, 8), timestep=steps,
                    class_labels=torch.randint(0, 10, (batch,), generator=g), return_dict=False)
    if kind == "pixart":
        return dict(hidden_states=randn(batch, 4, 8, 8), timestep=steps,
                    encoder_hidden_states=randn(batch, 6, 24), return_dict=False)
    if kind == "unet":
        return dict(sample=randn(batch, 4, 8, 8), timestep=steps, encoder_hidden_states=randn(batch, 5, 24),
                    return_dict=False)
    if kind == "hunyuan":
        from diffusers.models.embeddings import get_2d_rotary_pos_embed

        grid = 8 // 2
        cos, sin = get_2d_rotary_pos_embed(16, ((0, 0), (grid, grid)), (grid, grid))   # (L, head_dim) each
        return dict(hidden_states=randn(batch, 4, 8, 8), timestep=steps.float(),
                    encoder_hidden_states=randn(batch, 6, 24), text_embedding_mask=torch.ones(batch, 6),
                    encoder_hidden_states_t5=randn(batch, 4, 32), text_embedding_mask_t5=torch.ones(batch, 4),
                    image_rotary_emb=(cos.float(), sin.float()), return_dict=False)
    if kind == "sd3":
        return dict(hidden_states=randn(batch, 4, 8, 8), encoder_hidden_states=randn(batch, 5, 24),
                    pooled_projections=randn(batch, 16), timestep=steps, return_dict=False)
    if kind == "flux":
        side, text = 4, 5
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        return dict(hidden_states=randn(batch, side * side, 8), encoder_hidden_states=randn(batch, text, 24),
                    pooled_projections=randn(batch, 16), timestep=steps.float() / 1000,
                    img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3), return_dict=False)
    raise GraftError(f"unknown diffusers test model {kind!r}; valid: {', '.join(DIFFUSERS_KINDS)}")


def diffusers_inputs(model, batch: int) -> dict:
    """Example keyword inputs for a ``small_diffusers`` model at ``batch``."""
    name = type(model).__name__
    kind = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart", "UNet2DConditionModel": "unet",
            "HunyuanDiT2DModel": "hunyuan", "SD3Transformer2DModel": "sd3",
            "FluxTransformer2DModel": "flux"}.get(name)
    if kind is None:
        raise GraftError(f"no example inputs for diffusers model {name}; pass example inputs yourself")
    return small_diffusers_inputs(kind, batch)


def _diffusers(what: str, batch: int):
    if what in DIFFUSERS_KINDS:
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
