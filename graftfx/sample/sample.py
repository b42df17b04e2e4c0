"""Images from a diffusers pipeline whose transformer may be a grafted one (``graftfx sample``).

``load_pipeline(folder, grafted=...)`` loads a local diffusers pipeline folder (vae, scheduler,
text encoder, ...: ``DiffusionPipeline.from_pretrained``, local files only) and puts the grafted
transformer of a ``save_pretrained`` folder in place of its transformer (the folder's own
transformer, when it has one, is the base the graft is rebuilt on). ``sample_images`` runs the
pipeline in batches with a progress bar: class labels and classifier-free guidance for
``DiTPipeline``, prompt embeddings (``embeddings`` (N, L, D) and ``mask`` (N, L), as
``graftfx data captions`` writes them) or text prompts (when the pipeline has a text encoder) for
PixArt. ``write_images`` writes one PNG per image and a grid (``graftfx.eval.grid``), atomically.

graftfx's own DiT (``graftfx.models.DiT``: the bundled digits model, a DiT checkpoint) samples
through ``graftfx.models.diffusion.sample`` instead (``load_native`` / ``sample_native``), grafted
from an export folder (``graftfx.export.load_grafted``) when given; latents (4 channels) decode
through a local ``AutoencoderKL`` folder, pixel-space models (1 or 3 channels) need none.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from graftfx.errors import GraftError, first_line
from graftfx.io import atomic_path

PIXART = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
DIT = ("DiTPipeline",)



def class_labels(labels, n: int | None, classes: int) -> list[int]:
    """The labels to sample (default: ``n`` cycling through the classes, or one of each), at most
    ``n``; a label outside 0..classes-1 is a GraftError."""
    if labels is None:
        labels = [i % classes for i in range(n or classes)]
    labels = [int(x) for x in labels][: n or None]
    bad = [x for x in labels if not 0 <= x < classes]
    if bad:
        raise GraftError(f"--labels {bad}: the model has classes 0..{classes - 1}")
    return labels

def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise GraftError("graftfx sample needs diffusers; pip install 'graftfx[diffusers]'") from None
    return diffusers


def load_pipeline(folder, *, grafted=None, device="cpu", dtype=None, text_encoder: bool = True,
                  check_hash: bool = True):
    """The pipeline of a local folder, with the grafted transformer of ``grafted`` (a
    ``GraftedTransformer.save_pretrained`` folder) in place of its own when given.
    ``text_encoder=False`` skips loading the text encoder and tokenizer (prompt embeddings given)."""
    diffusers = _diffusers()
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise GraftError(f"--pipeline {folder}: no model_index.json there; give a local diffusers pipeline folder "
                         "(pipe.save_pretrained(FOLDER))")
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise GraftError(f"{index} is not valid JSON ({first_line(e)}); save the pipeline again") from None
    extra = {}
    if not text_encoder:
        extra.update({k: None for k in ("text_encoder", "tokenizer") if k in components})
    entry = components.get("transformer")
    has_base = isinstance(entry, list) and entry[0] is not None and (folder / "transformer").is_dir()
    if grafted is not None:       # rebuilt on the folder's transformer (its weights stored once), or alone
        from graftfx.export.pipeline import load_grafted_transformer

        extra["transformer"] = load_grafted_transformer(grafted, base=folder / "transformer" if has_base else None,
                                                        check_hash=check_hash and has_base)
    elif not has_base:
        raise GraftError(f"--pipeline {folder} has no transformer; pass --grafted FOLDER")
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **extra)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise GraftError(f"--pipeline {folder} could not be loaded: {first_line(e)}") from None
    pipe = pipe.to(device) if dtype is None else pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kind(pipe) -> str:
    name = type(pipe).__name__
    if name in DIT:
        return "dit"
    if name in PIXART:
        return "pixart"
    raise GraftError(f"graftfx sample runs {', '.join(DIT + PIXART)}; this folder holds a {name}")


def load_embeddings(path) -> dict[str, torch.Tensor]:
    """``{"embeddings": (N, L, D), "mask": (N, L)}`` from a .safetensors file (or a folder of
    ``graftfx data captions``)."""
    try:
        from graftfx.data import load_caption_embeddings
    except ImportError:
        load_caption_embeddings = None
    if load_caption_embeddings is not None:
        return load_caption_embeddings(path)
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise GraftError(f"prompt embeddings {path} not found; give a .safetensors with embeddings and mask")
    blob = load_file(str(path))
    if "embeddings" not in blob or "mask" not in blob:
        raise GraftError(f"prompt embeddings {path} lack embeddings and/or mask (has {', '.join(blob)})")
    return {"embeddings": blob["embeddings"], "mask": blob["mask"].long()}


def _rows(block: dict, n: int) -> dict:
    """``n`` rows of embeddings and mask, cycling through the file's."""
    e, m = block["embeddings"], block["mask"]
    idx = torch.arange(n) % e.shape[0]
    return {"embeddings": e[idx], "mask": m[idx]}


def sample_images(pipe, *, n: int | None = None, labels=None, embeddings=None, negative=None, prompts=None,
                  steps: int = 20, seed: int = 0, guidance: float | None = None, height: int | None = None,
                  width: int | None = None, batch_size: int = 4, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Images (N, 3, H, W) in [-1, 1] and the settings that made them.

    DiT: ``labels`` (default: ``n`` labels cycling through the classes); ``guidance`` > 1 is
    classifier-free guidance (DiTPipeline's null class is 1000: the model needs 1000 classes).
    PixArt: ``embeddings`` ({"embeddings", "mask"}), with ``negative`` ones for ``guidance`` > 1
    (default: the empty caption's ``null_embeddings``/``null_mask`` when the embeddings carry them)
    unless the pipeline has a text encoder (then the empty prompt), or ``prompts`` (text).
    One generator seeded ``seed`` draws every batch's noise in turn: same arguments, same images.
    """
    kind = pipeline_kind(pipe)
    cfg = pipe.transformer.config
    device = pipe._execution_device
    generator = torch.Generator(device=device).manual_seed(seed)
    settings = {"pipeline": type(pipe).__name__, "transformer": type(pipe.transformer).__name__, "steps": steps,
                "seed": seed, "scheduler": type(pipe.scheduler).__name__}
    chunks = []
    if kind == "dit":
        if embeddings is not None or prompts:
            raise GraftError("a DiT pipeline takes class labels (--labels), not prompts or embeddings")
        if height is not None or width is not None:
            size = cfg.sample_size * pipe.vae_scale_factor if hasattr(pipe, "vae_scale_factor") else None
            if (height, width) != (size, size):
                raise GraftError(f"a DiT pipeline samples at its model's size ({size} x {size}); drop --height/--width")
        classes = cfg.num_embeds_ada_norm
        labels = class_labels(labels, n, classes)
        guidance = 4.0 if guidance is None else guidance
        if guidance > 1 and classes != 1000:
            raise GraftError(f"--guidance {guidance:g}: DiTPipeline guides with null class 1000, but the model has "
                             f"{classes} classes; use --guidance 1")
        settings.update(labels=labels, guidance=guidance)
        batches = [labels[i:i + batch_size] for i in range(0, len(labels), batch_size)]
        for batch in _bar(batches, progress, len(labels)):
            out = pipe(class_labels=batch, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                       output_type="pt")
            chunks.append(torch.as_tensor(out.images).float().cpu())
    else:
        guidance = 4.5 if guidance is None else guidance
        if prompts:
            if getattr(pipe, "text_encoder", None) is None:
                raise GraftError("text prompts need the pipeline's text encoder, which this pipeline folder lacks; "
                                 "pass --embeddings FILE (graftfx data captions) instead")
            texts = [prompts[i % len(prompts)] for i in range(n or len(prompts))]
            items = [{"prompt": t} for t in texts]
        elif embeddings is not None:
            rows = _rows(embeddings, n or embeddings["embeddings"].shape[0])
            items = [{"prompt_embeds": rows["embeddings"][i:i + 1], "prompt_attention_mask": rows["mask"][i:i + 1]}
                     for i in range(rows["embeddings"].shape[0])]
            if guidance > 1:
                if negative is None and "null_embeddings" in embeddings:   # the empty caption, from graftfx data
                    negative = {"embeddings": embeddings["null_embeddings"][None], "mask": embeddings["null_mask"][None]}
                if negative is not None:
                    neg = _rows(negative, len(items))
                    for i, item in enumerate(items):
                        item.update(negative_prompt_embeds=neg["embeddings"][i:i + 1],
                                    negative_prompt_attention_mask=neg["mask"][i:i + 1], negative_prompt=None)
                elif getattr(pipe, "text_encoder", None) is None:
                    raise GraftError(f"--guidance {guidance:g} needs negative prompt embeddings: pass --negative FILE "
                                     "(embeddings of the empty prompt), a pipeline with a text encoder, or --guidance 1")
        else:
            raise GraftError("a PixArt pipeline needs --embeddings FILE or --prompt TEXT")
        binning = cfg.sample_size in (32, 64, 128, 256)
        settings.update(guidance=guidance, height=height, width=width, resolution_binning=binning)
        batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        dtype = pipe.transformer.dtype
        for batch in _bar(batches, progress, len(items)):
            call = {}
            for key in batch[0]:
                values = [b[key] for b in batch]
                if key in ("prompt", "negative_prompt"):
                    call[key] = None if values[0] is None else values
                else:
                    t = torch.cat(values).to(device)
                    call[key] = t.to(dtype) if t.is_floating_point() else t
            out = pipe(**call, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                       generator=generator, output_type="pt", use_resolution_binning=binning)
            chunks.append(torch.as_tensor(out.images).float().cpu())
    images = torch.cat(chunks) * 2 - 1                  # [0, 1] -> [-1, 1]
    return images, settings


def _bar(batches, progress: bool, total: int):
    if not progress:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=f"sampling {total} images", unit="batch")


def write_images(images: torch.Tensor, out, *, grid_nrow: int | None = None) -> dict:
    """``out/000000.png ...`` (one per image, pixel for pixel) and ``out/grid.png`` (images under 64
    pixels scaled up by whole pixels); returns the paths."""
    import math

    from PIL import Image

    from graftfx.eval.grid import save_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    files = []
    for i, array in enumerate(pixels):
        path = out / f"{i:06d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(tmp, format="PNG")
        files.append(path)
    nrow = grid_nrow or max(1, math.ceil(math.sqrt(len(files))))
    scale = max(1, 64 // max(images.shape[2:]))           # small images (8 x 8 digits) drawn bigger
    grid = save_grid(images, out / "grid.png", nrow=nrow, scale=scale, pad=2)
    return {"images": files, "grid": grid}


# ---------------------------------------------------------------------------------------------
# graftfx's own DiT
# ---------------------------------------------------------------------------------------------

def load_native(spec: str, *, grafted=None, device="cpu"):
    """(model, DiTConfig) for a graftfx DiT (``digits`` or a checkpoint path, as ``graftfx`` MODEL
    arguments), replaced by the grafted model of an export folder when ``grafted`` is given."""
    from graftfx.models import DiT
    from graftfx.models.zoo import resolve_model

    model, _, _ = resolve_model(spec, batch=2)
    if not isinstance(model, DiT):
        raise GraftError(f"--model {spec}: graftfx sample runs graftfx DiT models here (digits, a DiT checkpoint); "
                         "for diffusers models give --pipeline FOLDER")
    config = model.config
    if grafted is not None:
        from graftfx.export import load_grafted

        model = load_grafted(model, grafted)
    return model.to(device).eval(), config


def sample_native(model, config, *, labels=None, n: int | None = None, steps=50, seed: int = 0,
                  guidance: float | None = None, sampler: str = "ddpm", batch_size: int = 64, vae=None,
                  progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Images (N, C, H, W) in [-1, 1] from a graftfx DiT (or its grafted graph) with
    ``graftfx.models.diffusion.sample``: ``labels`` (default ``n`` cycling through the classes),
    ``guidance`` (default 1.5, the paper's) as the CFG scale; latents decode through ``vae``
    (a diffusers ``AutoencoderKL``, DiT's scale 0.18215)."""
    from graftfx.models.diffusion import sample

    classes = config.num_classes
    labels = class_labels(labels, n, classes)
    guidance = 1.5 if guidance is None else guidance
    if config.in_channels not in (1, 3) and vae is None:
        raise GraftError(f"the model makes {config.in_channels}-channel latents: pass --vae FOLDER (a diffusers "
                         "AutoencoderKL) to decode them")
    param = next(iter(model.parameters()))
    generator = torch.Generator(device=param.device).manual_seed(seed)
    noise = torch.randn(len(labels), config.in_channels, config.input_size, config.input_size,
                        generator=torch.Generator().manual_seed(seed))
    chunks = []
    batches = list(range(0, len(labels), batch_size))
    for start in _bar(batches, progress, len(labels)):
        y = torch.tensor(labels[start:start + batch_size], device=param.device)
        try:
            x = sample(model, y, steps=steps, cfg_scale=guidance, sampler=sampler, generator=generator,
                       noise=noise[start:start + batch_size].to(param.device), config=config)
        except ValueError as e:            # the sampler's own argument checks
            raise GraftError(f"sampling failed: {e}") from None
        if vae is not None:
            with torch.no_grad():
                x = vae.decode(x.to(vae.dtype) / 0.18215).sample
        chunks.append(x.float().cpu().clamp(-1, 1))
    settings = {"model": "graftfx DiT", "labels": labels, "guidance": guidance, "steps": steps, "seed": seed,
                "sampler": sampler}
    return torch.cat(chunks), settings


def load_vae(folder, device="cpu"):
    """A diffusers ``AutoencoderKL`` from a local folder (a pipeline's ``vae`` or the VAE itself)."""
    diffusers = _diffusers()
    folder = Path(folder)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise GraftError(f"--vae {folder}: no config.json there; give a local AutoencoderKL folder")
    try:
        return diffusers.AutoencoderKL.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise GraftError(f"--vae {folder} could not be loaded: {first_line(e)}") from None
