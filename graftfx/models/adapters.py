"""Model adapters: how to call a diffusion model with noised latents, a timestep and its
conditioning, and what its output predicts. Distillation (calibration inputs, stage 2's loss) and
sampling ask the adapter, never a model's signature.

An adapter is chosen by the model's class name (``adapter_for(model)``):

- ``DiT`` (graftfx's own, ``model(x, t, y)``), ``DiTTransformer2DModel`` (diffusers:
  ``hidden_states``, ``timestep``, ``class_labels``): class-conditional, conditioning ``labels``.
- ``PixArtTransformer2DModel`` (diffusers: ``hidden_states``, ``encoder_hidden_states`` +
  ``encoder_attention_mask``, ``timestep``, ``added_cond_kwargs``): text-conditional, conditioning
  ``embeddings`` (N, S, D) and ``mask`` (N, S), as ``graftfx data captions`` writes them.

Each adapter calls the model the way its diffusers pipeline does (the keywords a traced graph is
specialised to), so a graph traced from ``adapter.example(model, 2)`` takes the pipeline's calls.

Your own model: subclass ``ModelAdapter`` (``inputs`` builds the call, ``prediction`` reads the
output) and ``register_adapter("YourClassName", YourAdapter())`` before distilling; or give
distill a file of ready inputs (``ReadyInputs``: tensors named as ``forward``'s keywords, one row
per calibration sample, used as they are).

The noise: ``NoiseSchedule`` — DDPM-style (``epsilon`` or ``v_prediction``; betas ``linear``,
``scaled_linear`` or ``squaredcos_cap_v2``) or flow matching (``x_t = (1 - s) x0 + s noise``, target
``noise - x0``), read from a diffusers scheduler config (``scheduler_config.json`` of a pipeline
folder) or the model's defaults (DiT and PixArt: linear betas 1e-4..0.02 over 1000 steps, epsilon).
"""
from __future__ import annotations

import abc
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from graftfx.errors import GraftError

PREDICTIONS = ("epsilon", "v_prediction", "flow")
BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class NoiseSchedule:
    """The forward process a model was trained with, and what its output is regressed on."""

    prediction: str = "epsilon"        # epsilon | v_prediction | flow
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    shift: float = 1.0                 # flow matching: sigma -> shift * s / (1 + (shift - 1) s)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise GraftError(f"prediction type {self.prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if self.beta_schedule not in BETAS:
            raise GraftError(f"beta schedule {self.beta_schedule!r} is not one of {', '.join(BETAS)}; "
                             "give a scheduler config graftfx knows")
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise GraftError(f"num_train_timesteps must be an integer >= 1, got {self.num_timesteps!r}")
        self._abar = None if self.prediction == "flow" else torch.cumprod(1 - self.betas(), 0)

    def betas(self) -> torch.Tensor:
        T = self.num_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=torch.float64) ** 2
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """From a diffusers scheduler config (``scheduler_config.json``)."""
        name = str(config.get("_class_name", ""))
        if "FlowMatch" in name:
            return cls(prediction="flow", num_timesteps=int(config.get("num_train_timesteps", 1000)),
                       shift=float(config.get("shift", 1.0)))
        return cls(prediction=str(config.get("prediction_type", "epsilon")),
                   num_timesteps=int(config.get("num_train_timesteps", 1000)),
                   beta_start=float(config.get("beta_start", 1e-4)), beta_end=float(config.get("beta_end", 0.02)),
                   beta_schedule=str(config.get("beta_schedule", "linear")))

    @classmethod
    def from_folder(cls, folder) -> "NoiseSchedule":
        """A pipeline folder (its ``scheduler/``) or a scheduler folder / config file."""
        path = Path(folder)
        for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json", path):
            if cand.is_file():
                try:
                    return cls.from_config(json.loads(cand.read_text()))
                except (ValueError, UnicodeDecodeError):
                    raise GraftError(f"scheduler config {cand} is not valid JSON") from None
        raise GraftError(f"--scheduler {folder}: no scheduler_config.json there (nor in its scheduler/); give a "
                         "pipeline folder or a diffusers scheduler folder")

    def draw(self, generator: torch.Generator, n: int = 1) -> torch.Tensor:
        """Training timesteps: integers 0..T-1 (DDPM-style) or the flow time s in (0, 1) times T."""
        if self.prediction == "flow":
            s = torch.rand(n, generator=generator)
            s = self.shift * s / (1 + (self.shift - 1) * s)
            return s * self.num_timesteps
        return torch.randint(self.num_timesteps, (n,), generator=generator)

    def _coef(self, t: torch.Tensor, like: torch.Tensor):
        """(a_t, b_t) of x_t = a_t x0 + b_t noise: computed in float64, applied in float32 (as
        graftfx's GaussianDiffusion does, so DiT's calibration inputs are the same bits)."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        if self.prediction == "flow":
            s = t.double().cpu() / self.num_timesteps
            a, b = 1 - s, s
        else:
            abar = self._abar[t.long().cpu()]
            a, b = abar.sqrt(), (1 - abar).sqrt()
        return (a.float().to(like.device).reshape(shape), b.float().to(like.device).reshape(shape))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a, b = self._coef(t, x0)
        return a * x0 + b * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model's prediction is regressed on at (x0, t, noise)."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "flow":
            return noise - x0
        a, b = self._coef(t, x0)
        return a * noise - b * x0


class ModelAdapter(abc.ABC):
    """How to call one family of models. Subclasses set ``conditioning`` (the per-sample data it
    needs, besides latents) and write ``inputs``; ``prediction`` takes the first ``C`` channels
    of the output (models with a learned variance output 2C)."""

    name = "custom"
    conditioning: tuple[str, ...] = ()

    def schedule(self, model) -> NoiseSchedule:
        return NoiseSchedule()

    @abc.abstractmethod
    def inputs(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple[tuple, dict]:
        """(args, kwargs) calling ``model`` on noised latents ``x_t`` at timesteps ``t`` with the
        per-sample conditioning ``cond`` (a dict of the names in ``conditioning``)."""

    def example(self, model, batch: int = 2, device=None, shape=None, **options) -> tuple[tuple, dict]:
        """Random inputs of the model's shapes (latents of ``shape`` (C, H, W) when given), called
        as the pipeline calls it (for tracing), on the model's device and in its dtype (unless
        ``device`` says otherwise). ``options``: the conditioning's sizes (PixArt: ``text_length``)."""
        c, h, w = shape or self.latent_shape(model)
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, c, h, w, generator=g)
        t = torch.randint(1000, (batch,), generator=g)
        args, kwargs = self.inputs(model, x, t, self.example_conditioning(model, batch, g, **options))
        param = next(iter(model.parameters()), None)
        device = device if device is not None else (param.device if param is not None else None)
        dtype = param.dtype if param is not None and param.is_floating_point() else None

        def move(v):
            if isinstance(v, dict):
                return {k: move(u) for k, u in v.items()}
            if not isinstance(v, torch.Tensor):
                return v
            return v.to(device=device, dtype=dtype if v.is_floating_point() and dtype is not None else v.dtype)

        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def example_conditioning(self, model, batch: int, generator: torch.Generator, **options) -> dict:
        return {}

    def latent_shape(self, model) -> tuple[int, int, int]:
        cfg = model.config
        size = getattr(cfg, "sample_size", None) or getattr(cfg, "input_size", None)
        return int(cfg.in_channels), int(size), int(size)

    def prediction(self, model, output, channels: int) -> torch.Tensor:
        out = output.sample if hasattr(output, "sample") else output
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out[:, :channels]

    def null_conditioning(self, cond: dict, drop: torch.Tensor, model, null: dict | None = None) -> dict:
        """``cond`` with the samples where ``drop`` is True replaced by the unconditional input
        (classifier-free guidance training): the model's own (a null class), or ``null`` (one
        sample's conditioning without a batch dimension, e.g. the encoded empty caption);
        adapters with neither return ``cond``."""
        return cond

    def has_null(self, null: dict | None) -> bool:
        """Whether ``null_conditioning`` can drop conditioning, given ``null``."""
        return False


class _ClassConditional(ModelAdapter):
    conditioning = ("labels",)

    @abc.abstractmethod
    def num_classes(self, model) -> int:
        """The model's class count (its null class, for label dropout, is this index)."""

    def example_conditioning(self, model, batch, generator, **options):
        return {"labels": torch.randint(self.num_classes(model), (batch,), generator=generator)}

    def null_conditioning(self, cond, drop, model, null=None):
        y = cond["labels"]
        return {**cond, "labels": torch.where(drop.to(y.device), torch.full_like(y, self.num_classes(model)), y)}

    def has_null(self, null):
        return True


class GraftfxDiTAdapter(_ClassConditional):
    """graftfx's DiT: ``model(x, t, y)``."""

    name = "dit"

    def num_classes(self, model):
        return int(model.config.num_classes)

    def inputs(self, model, x_t, t, cond):
        return (x_t, t, cond["labels"]), {}


class DiffusersDiTAdapter(_ClassConditional):
    """diffusers ``DiTTransformer2DModel``, called as ``DiTPipeline`` calls it."""

    name = "diffusers-dit"

    def num_classes(self, model):
        return int(model.config.num_embeds_ada_norm)

    def inputs(self, model, x_t, t, cond):
        return (), {"hidden_states": x_t, "timestep": t, "class_labels": cond["labels"], "return_dict": False}


class PixArtAdapter(ModelAdapter):
    """diffusers ``PixArtTransformer2DModel``, called as ``PixArtSigmaPipeline`` calls it: the
    caption embeddings, their mask, ``added_cond_kwargs`` with no resolution/aspect ratio (Sigma)."""

    name = "pixart"
    conditioning = ("embeddings", "mask")

    def inputs(self, model, x_t, t, cond):
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(model.config, "use_additional_conditions", False):   # PixArt-alpha: the image size, in pixels
            b, _, h, w = x_t.shape
            added = {"resolution": torch.tensor([[h * 8.0, w * 8.0]] * b, device=x_t.device, dtype=x_t.dtype),
                     "aspect_ratio": torch.tensor([[h / w]] * b, device=x_t.device, dtype=x_t.dtype)}
        return (), {"hidden_states": x_t, "encoder_hidden_states": cond["embeddings"],
                    "encoder_attention_mask": cond["mask"], "timestep": t,
                    "added_cond_kwargs": added, "return_dict": False}

    def example_conditioning(self, model, batch, generator, text_length: int = 300):
        width = int(model.config.caption_channels)
        tokens = int(text_length)
        mask = torch.ones(batch, tokens, dtype=torch.long)
        mask[0, tokens // 2:] = 0           # one padded caption, so the mask path is traced
        return {"embeddings": torch.randn(batch, tokens, width, generator=generator), "mask": mask}

    def null_conditioning(self, cond, drop, model, null=None):
        # PixArt's unconditional input is the encoded empty caption (``graftfx data captions``
        # writes it); without it, every caption is kept and no unconditional branch trains
        if not self.has_null(null):
            return cond
        out = dict(cond)
        for key in ("embeddings", "mask"):
            v = cond[key]
            row = null[key].to(device=v.device, dtype=v.dtype).expand_as(v)          # (B, L[, D])
            out[key] = torch.where(drop.to(v.device).view(-1, *[1] * (v.dim() - 1)), row, v)
        return out

    def has_null(self, null):
        return bool(null) and {"embeddings", "mask"} <= set(null)


ADAPTERS: dict[str, ModelAdapter] = {"DiT": GraftfxDiTAdapter(), "DiTTransformer2DModel": DiffusersDiTAdapter(),
                                     "PixArtTransformer2DModel": PixArtAdapter()}


def register_adapter(class_name: str, adapter: ModelAdapter) -> None:
    """Use ``adapter`` for models whose class is called ``class_name``."""
    if not isinstance(adapter, ModelAdapter):
        raise GraftError(f"adapter for {class_name} must be a graftfx.models.adapters.ModelAdapter, "
                         f"got {type(adapter).__name__}")
    ADAPTERS[class_name] = adapter


def adapter_for(model) -> ModelAdapter:
    name = type(model).__name__
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise GraftError(f"no model adapter for {name}: graftfx distils {', '.join(ADAPTERS)}; register one "
                     "(graftfx.models.adapters.register_adapter) or give a file of ready inputs (--inputs)")


class ReadyInputs:
    """Calibration inputs a user prepared: a safetensors file whose tensors are named as the
    model's ``forward`` keywords, each (N, ...) with one row per sample, used as they are (already
    noised). Non-tensor keywords (``return_dict=False``) come from ``fixed``."""

    def __init__(self, path, fixed: dict | None = None):
        from graftfx.models.load import read_state_dict

        self.path = Path(path)
        self.tensors = read_state_dict(self.path, what="inputs file")
        if not self.tensors:
            raise GraftError(f"inputs file {path} holds no tensors; it needs one per forward keyword, (N, ...) each")
        counts = {k: int(v.shape[0]) if v.ndim else 0 for k, v in self.tensors.items()}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise GraftError(f"inputs file {path}: every tensor needs the same number of rows (samples), got {counts}")
        self.rows = next(iter(counts.values()))
        self.fixed = dict(fixed or {})

    def call(self, indices) -> tuple[tuple, dict]:
        idx = torch.as_tensor(list(indices), dtype=torch.long) % self.rows
        return (), {**{k: v[idx] for k, v in self.tensors.items()}, **self.fixed}
