"""``evaluate``: sample N images per class with the DiT sampler and measure them, in one record.

Every number is stored with the sampler settings that produced it (steps, CFG scale, sampler,
seed), the sample count, the reference set and the digest of the feature extractor's weights.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import torch

from graftfx.errors import GraftError

from graftfx.io import atomic_write_text

SAMPLER_DEFAULTS = dict(steps=250, cfg_scale=1.5, sampler="ddpm", seed=0)  # the paper's FID settings


@dataclass
class EvalRecord:
    """One measurement. ``accuracy`` is None when no labels (or no digit classifier) apply."""

    fid: float
    accuracy: float | None
    n: int
    n_per_class: int | None
    steps: int | str | None
    cfg_scale: float | None
    sampler: str | None
    seed: int | None
    metric: str = "digits-fid"
    reference: str = "full"
    extractor: str | None = None
    per_class_accuracy: list | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.3f}"
        parts = [f"{self.sampler} sampler" if self.sampler is not None else None,
                 f"{self.steps} steps" if self.steps is not None else None,
                 f"cfg {self.cfg_scale:g}" if self.cfg_scale is not None else None,
                 f"seed {self.seed}" if self.seed is not None else None]
        how = ", ".join(p for p in parts if p) or "sampler settings not recorded"
        return f"{self.metric} {self.fid:.3f}  class accuracy {acc}  (n={self.n}, {how}, reference {self.reference})"

    def write_json(self, path):
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _device_of(model) -> torch.device:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def sample_per_class(model, n_per_class: int, *, steps=250, cfg_scale: float = 1.5, sampler: str = "ddpm",
                     seed: int = 0, batch_size: int = 500, num_classes: int | None = None, config=None,
                     eta: float = 0.0, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` samples of every class: (images (N, C, H, W) float32 CPU, labels (N,)).

    Labels cycle ``0, 1, ..., K-1, 0, 1, ...`` (a grid with ``nrow=K`` shows one class per
    column). The initial noise comes from a CPU generator seeded ``seed`` (the same for any
    device and batch size); the sampler's per-step noise from a generator on the model's device
    seeded ``seed + 1``. Same model, seed and batch size -> same samples; two models given the
    same arguments start from the same noise and labels (for side-by-side comparisons).
    """
    from graftfx.models.diffusion import sample

    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        raise GraftError("model has no .config: pass config=<the model's DiTConfig> (e.g. for a grafted graph)")
    if n_per_class < 1 or batch_size < 1:
        raise GraftError(f"n_per_class={n_per_class} and batch_size={batch_size} must be >= 1")
    k = num_classes or config.num_classes
    labels = torch.arange(k).repeat(n_per_class)
    shape = (len(labels), config.in_channels, config.input_size, config.input_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    device = _device_of(model)
    step_gen = torch.Generator(device=device).manual_seed(seed + 1)
    out = []
    batches = range(0, len(labels), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"sampling {len(labels)} images", unit="batch")
    for start in batches:
        y = labels[start:start + batch_size].to(device)
        z = noise[start:start + batch_size].to(device)
        try:
            x = sample(model, y, steps=steps, cfg_scale=cfg_scale, sampler=sampler, generator=step_gen,
                       noise=z, eta=eta, config=config)
        except ValueError as e:  # the sampler's argument checks
            raise GraftError(f"sampling failed: {e}") from None
        out.append(x.float().cpu())
    return torch.cat(out), labels


def evaluate(model_or_samples, labels=None, *, n_per_class: int = 100, steps=None, cfg_scale: float | None = None,
             sampler: str | None = None, seed: int | None = None, batch_size: int = 500, reference=None,
             classifier=None, fid=None, decode=None, config=None, progress: bool = True) -> EvalRecord:
    """Measure a class-conditional DiT (or given samples): FID and class accuracy, with settings.

    ``model_or_samples``: a DiT (or any model ``graftfx.models.diffusion.sample`` accepts; pass
    ``config`` when it has no ``.config``), sampled ``n_per_class`` times per class with
    ``steps`` (default 250), ``cfg_scale`` (1.5), ``sampler`` ("ddpm"), ``seed`` (0); or a
    tensor of samples, with ``labels`` for the accuracy, and the settings that made them
    recorded as given (None when not given).

    ``fid``: None for Digits-FID against ``reference`` (default: the full real digits set) with
    ``classifier`` (default: the committed one), plus class accuracy; or an
    ``InceptionFID`` for real FID (accuracy is then None). ``decode`` maps samples to images
    first (e.g. a VAE decoder for latent models).
    """
    from .digits import class_accuracy, digits_fid, per_class_accuracy

    start = time.perf_counter()
    if isinstance(model_or_samples, torch.Tensor):
        samples, n_pc = model_or_samples, None
        if labels is not None:
            labels = torch.as_tensor(labels).long()
    else:
        steps = SAMPLER_DEFAULTS["steps"] if steps is None else steps
        cfg_scale = SAMPLER_DEFAULTS["cfg_scale"] if cfg_scale is None else cfg_scale
        sampler = SAMPLER_DEFAULTS["sampler"] if sampler is None else sampler
        seed = SAMPLER_DEFAULTS["seed"] if seed is None else seed
        samples, labels = sample_per_class(model_or_samples, n_per_class, steps=steps, cfg_scale=cfg_scale,
                                           sampler=sampler, seed=seed, batch_size=batch_size, config=config,
                                           progress=progress)
        n_pc = n_per_class
    if decode is not None:
        with torch.no_grad():
            samples = decode(samples)
    if fid is None:
        from .classifier import DEFAULT_WEIGHTS, file_digest

        value = digits_fid(samples, reference, classifier=classifier)
        acc = per = None
        if labels is not None:
            acc = class_accuracy(samples, labels, classifier=classifier)
            per = per_class_accuracy(samples, labels, classifier=classifier)
        extractor = "classifier " + (file_digest(DEFAULT_WEIGHTS) if classifier is None else "(given)")
        metric, ref = "digits-fid", _reference_name(reference)
    else:
        value, acc, per = fid(samples), None, None
        metric, ref, extractor = fid.metric, fid.reference_name, fid.extractor_name
    if not math.isfinite(value):
        raise GraftError(f"{metric} came out {value}: the samples' features are degenerate; check the samples")
    return EvalRecord(fid=value, accuracy=acc, n=int(samples.shape[0]), n_per_class=n_pc, steps=steps,
                      cfg_scale=cfg_scale, sampler=sampler, seed=seed, metric=metric, reference=ref,
                      extractor=extractor, per_class_accuracy=per, seconds=time.perf_counter() - start)


def _reference_name(reference) -> str:
    if reference is None or isinstance(reference, str):
        return reference or "full"
    if isinstance(reference, torch.Tensor):
        return f"images ({reference.shape[0]})"
    return f"stats (n={getattr(reference, 'n', '?')})"
