"""Resolve a model spec (CLI's MODEL argument) to (model, example args, example kwargs).

- ``digits``: the bundled pretrained digits DiT (graftfx/assets/digits/dit.safetensors).
- ``DiT-S/2`` ... ``DiT-XL/8``: a preset; random weights, or the meta device (``meta=True``:
  nothing materialised, for inspecting big models).
- a path ending in ``.pt``, ``.pth`` or ``.safetensors``: ``load_dit``.
- ``diffusers:dit`` / ``pixart`` / ``unet`` / ``hunyuan`` / ``sd3`` / ``flux``: small random
  diffusers models at real structure (for trying things without a hub), or ``diffusers:/local/folder`` holding a saved diffusers transformer.
- ``timm:vit`` / ``timm:swin``: small random timm models; ``timm:NAME``: ``timm.create_model(NAME)``
  with random weights (no download) and an image batch at its default input size.
- ``transformers:vit`` / ``clip`` / ``bert`` / ``llama``: small random transformers models;
  ``transformers:/local/folder``: a saved model (its ``config.json`` and weights), with example
  ``pixel_values`` (vision configs) or ``input_ids`` (text configs).

Every small model is seeded and has the structure of its library's real class; only the sizes
are tiny, so a trace takes a second.
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
    if spec.startswith("timm:"):
        return _timm(spec.split(":", 1)[1], batch)
    if spec.startswith("transformers:"):
        return _transformers(spec.split(":", 1)[1], batch)
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".safetensors"):
        model = load_dit(path)
        return model, model.example_inputs(batch), {}
    choices = ", ".join(list(DiT_models) + ["digits"] + [f"diffusers:{k}" for k in DIFFUSERS_KINDS]
                        + ["diffusers:FOLDER"] + [f"timm:{k}" for k in TIMM_KINDS] + ["timm:NAME"]
                        + [f"transformers:{k}" for k in TRANSFORMERS_KINDS]
                        + ["transformers:FOLDER", "PATH.pt", "PATH.safetensors"])
    raise GraftError(f"unknown model {spec!r}; valid: {choices}")


DIFFUSERS_KINDS = ("dit", "pixart", "unet", "hunyuan", "sd3", "flux", "stable_audio")


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
    if kind == "stable_audio":   # grouped-query self-attention, rotary on half of each head
        return diffusers.StableAudioDiTModel(
            sample_size=16, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=24, time_proj_dim=16,
            global_states_input_dim=12, cross_attention_input_dim=20).eval()
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
    if kind == "stable_audio":
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        rope = get_1d_rotary_pos_embed(8, 16 + 1, use_real=True, repeat_interleave_real=False)  # + the global token
        return dict(hidden_states=randn(batch, 4, 16), timestep=steps, encoder_hidden_states=randn(batch, 5, 20),
                    global_hidden_states=randn(batch, 1, 12), rotary_embedding=rope, return_dict=False)
    raise GraftError(f"unknown diffusers test model {kind!r}; valid: {', '.join(DIFFUSERS_KINDS)}")


def diffusers_inputs(model, batch: int) -> dict:
    """Example keyword inputs for a ``small_diffusers`` model at ``batch``."""
    name = type(model).__name__
    kind = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart", "UNet2DConditionModel": "unet",
            "HunyuanDiT2DModel": "hunyuan", "SD3Transformer2DModel": "sd3",
            "FluxTransformer2DModel": "flux", "StableAudioDiTModel": "stable_audio"}.get(name)
    if kind is None:
        raise GraftError(f"no example inputs for diffusers model {name}; pass example inputs yourself")
    return small_diffusers_inputs(kind, batch)


def _diffusers(what: str, batch: int):
    if what in DIFFUSERS_KINDS:
        model = small_diffusers(what)
    else:
        folder = Path(what)
        if not (folder / "config.json").is_file():
            raise GraftError(f"diffusers:{what}: not one of {', '.join(DIFFUSERS_KINDS)} and not a folder with a "
                             "config.json (a saved diffusers model)")
        import json

        import diffusers

        name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise GraftError(f"{folder}/config.json names class {name!r}, which diffusers does not have")
        model = cls.from_pretrained(str(folder)).eval()
    return model, (), diffusers_inputs(model, batch)


# ----------------------------------------------------------------------------------- timm

TIMM_KINDS = ("vit", "swin")


def import_timm():
    """``timm``, or a GraftError saying how to install it (timm imports torchvision)."""
    try:
        import timm
    except ImportError as e:
        raise GraftError(f"timm could not be imported ({e}); pip install 'graftfx[timm]' with a torchvision "
                         "that matches your torch") from None
    return timm


def small_timm(kind: str):
    """Small random timm models at real structure: a ViT and a one-stage Swin (16x16 images)."""
    timm = import_timm()
    if kind == "vit":
        return timm.models.vision_transformer.VisionTransformer(
            img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2,
            mlp_ratio=2.0).eval()
    if kind == "swin":
        return timm.models.swin_transformer.SwinTransformer(
            img_size=16, patch_size=2, in_chans=3, num_classes=5, embed_dim=16, depths=(2,), num_heads=(2,),
            window_size=4, mlp_ratio=2.0).eval()
    raise GraftError(f"unknown small timm model {kind!r}; valid: {', '.join(TIMM_KINDS)}, or a timm model name")


def image_batch(batch: int, size: int = 16, channels: int = 3) -> torch.Tensor:
    """Example images (batch, channels, size, size), seeded by the batch."""
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(batch))


def _timm(what: str, batch: int):
    if what in TIMM_KINDS:
        return small_timm(what), (image_batch(batch),), {}
    if not what.strip():
        raise GraftError(f"timm:{what}: give a timm model name (timm:vit_base_patch16_224) or one of "
                         f"{', '.join(TIMM_KINDS)}")
    timm = import_timm()
    try:
        model = timm.create_model(what, pretrained=False).eval()
    except RuntimeError as e:          # timm's "Unknown model (...)"
        near = timm.list_models(f"*{what.split('_')[0]}*")[:5]
        raise GraftError(f"timm:{what}: {str(e).splitlines()[0]}" + (f"; e.g. {', '.join(near)}" if near else "")) from None
    c, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, (torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(batch)),), {}


# --------------------------------------------------------------------------- transformers

TRANSFORMERS_KINDS = ("vit", "clip", "bert", "llama")


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise GraftError("transformers is not installed; pip install transformers") from None
    return transformers


def small_transformers(kind: str):
    """Small random transformers models at real structure: ViT and CLIP vision encoders (16x16
    images), a BERT encoder and a Llama decoder with grouped-query attention (vocabulary 50)."""
    transformers = _import_transformers()
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "vit":
        cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, **common)
        return transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    if kind == "clip":
        cfg = transformers.CLIPVisionConfig(image_size=16, patch_size=4, num_channels=3, **common)
        return transformers.CLIPVisionModel(cfg).eval()
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=50, max_position_embeddings=32, **common)
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=50, max_position_embeddings=32, num_key_value_heads=1,
                                       use_cache=False, **common)
        return transformers.LlamaForCausalLM(cfg).eval()
    raise GraftError(f"unknown small transformers model {kind!r}; valid: {', '.join(TRANSFORMERS_KINDS)}, "
                     "or a local model folder")


def token_batch(batch: int, length: int = 8, vocab: int = 50) -> torch.Tensor:
    """Example token ids (batch, length), seeded by the batch."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(batch))


def transformers_inputs(model, batch: int) -> dict:
    """Example keyword inputs for a transformers model, from its config: ``pixel_values`` for
    vision configs (``image_size``), ``input_ids`` for text configs (``vocab_size``)."""
    cfg = model.config
    cfg = getattr(cfg, "vision_config", None) or cfg
    if getattr(cfg, "image_size", None):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        return {"pixel_values": image_batch(batch, size, getattr(cfg, "num_channels", 3))}
    if getattr(cfg, "vocab_size", None):
        length = min(8, getattr(cfg, "max_position_embeddings", 8) or 8)
        return {"input_ids": token_batch(batch, length, cfg.vocab_size)}
    raise GraftError(f"no example inputs for {type(model).__name__} (its config has neither image_size nor "
                     "vocab_size); trace it from Python with graftfx.trace(model, args, kwargs)")


def _transformers(what: str, batch: int):
    if what in TRANSFORMERS_KINDS:
        model = small_transformers(what)
        return model, (), transformers_inputs(model, batch)
    folder = Path(what)
    if not (folder / "config.json").is_file():
        raise GraftError(f"transformers:{what}: not one of {', '.join(TRANSFORMERS_KINDS)} and not a folder with a "
                         "config.json (a saved transformers model)")
    transformers = _import_transformers()
    try:
        model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise GraftError(f"transformers:{folder}: could not be loaded: {str(e).splitlines()[0]}") from None
    return model, (), transformers_inputs(model, batch)
