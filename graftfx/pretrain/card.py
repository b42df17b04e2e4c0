"""End of a pretraining run: the EMA weights as ``dit.safetensors``, a 10 x 10 sample grid
``dit-samples.png`` and a model card ``dit.md`` stating how both were made."""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path

import torch

from graftfx.models.diffusion import sample

from graftfx.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_text

PER_CLASS = 10


def export_bundle(out, ema, settings, state: dict, step: int, num_timesteps: int) -> dict[str, Path]:
    """Write dit.safetensors, dit-samples.png and dit.md into ``out``; returns their paths."""
    out = Path(out)
    cfg = ema.config
    weights = atomic_save_safetensors(out / "dit.safetensors", ema.state_dict(), {
        "format": "graftfx-dit", "config": json.dumps(asdict(cfg), sort_keys=True), "step": str(step),
        "data": "sklearn load_digits, graftfx.data.digits_split() train split",
    })
    labels = torch.arange(cfg.num_classes).repeat_interleave(PER_CLASS)      # rows of the grid = classes
    g = torch.Generator().manual_seed(settings.seed)
    images = sample(ema, labels, steps=settings.sample_steps, cfg_scale=settings.cfg_scale, sampler="ddpm",
                    generator=g, progress=True, clip_denoised=True, num_timesteps=num_timesteps)
    grid = out / "dit-samples.png"
    atomic_write_bytes(grid, grid_png(images, cfg.num_classes, PER_CLASS,
                                      f"DDPM {settings.sample_steps} steps, CFG {settings.cfg_scale:g}, step {step}"))
    card = out / "dit.md"
    atomic_write_text(card, card_text(ema, settings, state, step, weights, grid, num_timesteps))
    return {"dit.safetensors": weights, "dit-samples.png": grid, "dit.md": card}


def grid_png(images: torch.Tensor, rows: int, cols: int, title: str) -> bytes:
    """PNG bytes of ``images`` (rows*cols, 1, H, W) in [-1, 1] as a labelled grid, one class per row."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, _, h, w = images.shape
    pad = 1
    canvas = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad), float("nan"))
    pics = images[:, 0].clamp(-1, 1).reshape(rows, cols, h, w)           # (rows, cols, H, W)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            canvas[top:top + h, left:left + w] = pics[r, c]
    fig = Figure(figsize=(cols * 0.5 + 0.8, rows * 0.5 + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="#4060a0")
    ax.imshow(canvas.numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 - 0.5 for r in range(rows)], [str(r) for r in range(rows)])
    ax.set_xticks([])
    ax.set_ylabel("class")
    ax.set_title(title, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def card_text(ema, settings, state: dict, step: int, weights: Path, grid: Path, num_timesteps: int) -> str:
    cfg = ema.config
    params = sum(p.numel() for p in ema.parameters())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    size_mb = weights.stat().st_size / 1e6
    runs = state.get("runs", [])
    commands = "\n".join(f"    {r.get('command') or '(called from Python: train_digits)'}" for r in runs)
    run_rows = "\n".join(
        f"| {r['start_step']} -> {r['end_step']} | {r['wall_s'] / 60:.1f} min | {r['threads']} | {r['torch']} |"
        for r in runs)
    final = state.get("final_loss")
    held = state.get("eval_loss")
    config_rows = "\n".join(f"| `{k}` | {v} |" for k, v in asdict(cfg).items())
    return f"""# Bundled digits DiT: `dit.safetensors`

A class-conditional DiT trained from scratch by `graftfx pretrain digits` on the pixels of
scikit-learn's 8x8 handwritten digits (no VAE: the "latents" are the images). It is graftfx's
small real pretrained model: the teacher for grafting, distillation and evaluation runs that must
fit a CPU. Load it with `graftfx.models.load_bundled_digits_dit()`.

## Weights

- File: `dit.safetensors`, {size_mb:.1f} MB, sha256 `{digest}`.
- The EMA weights after {step} steps, as the state dict of `graftfx.models.DiT` (public DiT key
  layout: `x_embedder.proj`, `t_embedder.mlp.0/.2`, `y_embedder.embedding_table`, `pos_embed`,
  `blocks.N.*`, `final_layer.*`), float32, {params:,} parameters. The header metadata holds
  the config as JSON.
- The number of heads is not visible in the weights: load with the config below
  (`load_bundled_digits_dit()` does).

| config | value |
|---|---|
{config_rows}

## Data

`graftfx.data.digits_split()` (test fraction 0.2, split seed 0): scikit-learn `load_digits`,
pixels 0..16 mapped to [-1, 1], shape (1, 8, 8). Trained on the train split only; the held-out
split is kept for classifiers and FID references. No augmentation.

## Training

- Diffusion: {num_timesteps} steps, linear betas 1e-4 .. 0.02, learned sigma; loss = eps-MSE + VB
  (`GaussianDiffusion.training_losses`), t uniform over all steps.
- Label dropout {cfg.class_dropout_prob} (null class {cfg.num_classes}) for classifier-free guidance.
- AdamW, betas (0.9, 0.999), weight decay {settings.weight_decay}, lr {settings.lr:g} with
  {settings.warmup} linear warm-up steps, then constant; gradient norm clipped to {settings.grad_clip:g}.
- EMA of the weights, decay min({settings.ema_decay}, (1 + step) / (10 + step)).
- Batch {settings.batch}, {step} steps ({step * settings.batch / max(1, _train_size(state)):.1f} epochs of the train
  split), seed {settings.seed}; batches are per-epoch permutations drawn from the seed.
- Wall time of the training loop (checkpoints and held-out evaluations included, the sample grid
  not): {state.get('wall_s', 0.0) / 60:.1f} min in all, on the CPU:

| steps | wall time | torch threads | torch |
|---|---|---|---|
{run_rows}

Command(s), in order (a later one resumes the earlier):

{commands}

## Results

- Final training loss (mean over the last logging window, up to {settings.log_every} steps): {_fmt(final)}.
- Held-out loss of the EMA weights (the test split, 2 draws of t and noise per image, fixed seed):
  {_fmt(held)}.

## Samples

![samples]({grid.name})

`{grid.name}`: one row per class (0 at the top), {PER_CLASS} samples each, from the EMA weights
with the ancestral DDPM sampler over {settings.sample_steps} respaced steps, classifier-free
guidance scale {settings.cfg_scale:g} on the eps channel, predicted x0 clipped to [-1, 1],
generator seed {settings.seed}
(`graftfx.models.diffusion.sample(model, labels, steps={settings.sample_steps}, cfg_scale={settings.cfg_scale:g},
sampler="ddpm", clip_denoised=True)`).
"""


def _train_size(state: dict) -> int:
    return int(state.get("train_size", 0))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
