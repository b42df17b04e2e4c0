"""Pretrain a DiT on scikit-learn's 8x8 digits with the DiT diffusion loss.

Every step draws its batch, timesteps, noise and label dropout from a seed derived from
``(seed, step)`` alone, so a run is reproducible from its seed and ``--resume`` from a
checkpoint continues exactly as the uninterrupted run would have (bit for bit on the CPU with the
same thread count). The learning rate warms up linearly and then stays constant, so a run can be
extended with ``--resume --steps MORE`` without changing the steps already taken.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from graftfx.data import DIGITS_CONFIG, digits_split
from graftfx.errors import GraftError
from graftfx.models import DiT, DiTConfig, GaussianDiffusion

from graftfx.training import CheckpointStore, Metrics, run_steps

from .card import export_bundle

NUM_TIMESTEPS = 1000
# Settings that define the trajectory: a resumed run must use the checkpoint's values.
LOCKED = ("batch", "lr", "warmup", "weight_decay", "ema_decay", "grad_clip", "seed", "model")
# Seed-stream tags (mixed with the seed by numpy's SeedSequence).
_STEP, _EPOCH, _INIT, _EVAL = 1, 2, 3, 4


@dataclass
class TrainSettings:
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 250
    log_every: int = 25
    keep: int = 2
    sample_steps: int = 100
    cfg_scale: float = 2.0
    model: dict = field(default_factory=lambda: dict(DIGITS_CONFIG))

    def __post_init__(self):
        ints = dict(steps=1, batch=1, warmup=0, ckpt_every=1, log_every=1, keep=1, sample_steps=1, seed=0)
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise GraftError(f"--{_flag(name)} must be an integer >= {low}, got {value!r}; "
                                 f"fix: pass an integer >= {low}")
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a positive number", "1e-3")
        _check(0.0 <= self.ema_decay < 1.0, "ema-decay", self.ema_decay, "in [0, 1)", "0.999")
        _check(self.grad_clip > 0 and math.isfinite(self.grad_clip), "grad-clip", self.grad_clip,
               "a positive number", "1.0")
        _check(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight-decay", self.weight_decay,
               ">= 0", "0")
        _check(math.isfinite(self.cfg_scale), "cfg-scale", self.cfg_scale, "a finite number", "2.0")
        self.model = dict(self.model)

    def config(self) -> DiTConfig:
        return DiTConfig(**self.model)


def _check(ok: bool, flag: str, value, rule: str, example: str) -> None:
    if not ok:
        raise GraftError(f"--{flag} must be {rule}, got {value!r}; fix: pass e.g. --{flag} {example}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class TrainResult:
    out: Path
    step: int
    model: DiT
    ema: DiT
    final_loss: float | None
    eval_loss: float | None
    wall_s: float
    files: dict[str, Path]


def derive_seed(seed: int, tag: int, index: int = 0) -> int:
    """A well-mixed 63-bit seed for stream ``tag`` at ``index`` (a step or an epoch)."""
    state = np.random.SeedSequence([seed, tag, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Rows of step ``step``: consecutive slices of a fresh permutation of the ``n`` rows per epoch."""
    pos = step * batch + torch.arange(batch)                  # (B,) positions in the endless stream
    epochs = pos // n
    rows = torch.empty(batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        g = torch.Generator().manual_seed(derive_seed(seed, _EPOCH, epoch))
        perm = torch.randperm(n, generator=g)
        mask = epochs == epoch
        rows[mask] = perm[pos[mask] % n]
    return rows


def lr_at(settings: TrainSettings, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant."""
    if settings.warmup == 0:
        return settings.lr
    return settings.lr * min(1.0, (step + 1) / settings.warmup)


def ema_decay_at(settings: TrainSettings, step: int) -> float:
    """EMA decay ramped in as ``(1 + step) / (10 + step)`` up to ``ema_decay``: early steps forget the init."""
    return min(settings.ema_decay, (1.0 + step) / (10.0 + step))


def checkpoint_store(out, keep: int = 2) -> CheckpointStore:
    """``OUT/checkpoints``: ``step-N/weights.safetensors`` (``model.<key>`` and ``ema.<key>``, DiT key
    layout), ``step-N/optimizer.safetensors`` (the AdamW state), ``step-N/state.json`` (settings,
    wall time, the runs so far); see ``graftfx.training.checkpoint``."""
    return CheckpointStore(Path(out) / "checkpoints", keep=keep)


def resolve_settings(out, given: dict, resume: bool) -> TrainSettings:
    """Settings from the flags given; with ``resume``, unspecified ones come from the checkpoint."""
    given = {k: v for k, v in given.items() if v is not None}
    if not resume:
        return TrainSettings(**given)
    saved = checkpoint_store(out).require().meta["settings"]
    for name in LOCKED:
        if name in given and given[name] != saved[name]:
            raise GraftError(f"--{_flag(name)} {given[name]} differs from the checkpoint's {saved[name]} in {out}; "
                             f"fix: drop --{_flag(name)} when resuming (or start a new --out)")
    return TrainSettings(**{**saved, **given})


def train_digits(out, settings: TrainSettings | None = None, *, resume: bool = False, data=None,
                 progress: bool = True, command: str | None = None, export: bool = True) -> TrainResult:
    """Train (or with ``resume`` continue) a digits DiT in ``out``; returns the models and files.

    ``data``: ``((x_train, y_train), (x_test, y_test))``, default ``digits_split()``.
    With ``export``, the EMA weights, a sample grid and a model card are written at the end
    (``dit.safetensors``, ``dit-samples.png``, ``dit.md``; see ``card.py``).
    """
    settings = settings or TrainSettings()
    out = Path(out)
    store = checkpoint_store(out, settings.keep)
    (x_train, y_train), (x_test, y_test) = data if data is not None else digits_split()
    cfg = settings.config()
    if tuple(x_train.shape[1:]) != (cfg.in_channels, cfg.input_size, cfg.input_size):
        raise GraftError(f"training images have shape {tuple(x_train.shape[1:])}, the model expects "
                         f"{(cfg.in_channels, cfg.input_size, cfg.input_size)}; "
                         "fix: match the model config to the data")
    diffusion = GaussianDiffusion(NUM_TIMESTEPS, learn_sigma=cfg.learn_sigma)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(settings.seed, _INIT))
        model = DiT(cfg)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.999),
                                  weight_decay=settings.weight_decay)
    state = {"runs": [], "wall_s": 0.0, "final_loss": None, "eval_loss": None}
    metrics = Metrics(out / "metrics.jsonl")
    start = 0
    if resume:
        start, state = _restore(store, settings, model, ema, optimizer)
    else:
        existing = store.latest()
        if existing is not None:
            raise GraftError(f"{out} already holds a training run (checkpoint at step {existing.step}); "
                             "fix: pass --resume to continue it, or choose another --out")
    metrics.start(start if resume else None)

    run = {"command": command, "start_step": start, "end_step": start, "wall_s": 0.0,
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    state["runs"] = list(state["runs"]) + [run]
    state["settings"] = asdict(settings)
    state["train_size"] = len(x_train)
    t0 = time.perf_counter()
    wall_before = float(state["wall_s"])

    def snapshot(step):
        run["end_step"] = step
        run["wall_s"] = time.perf_counter() - t0
        state["wall_s"] = wall_before + run["wall_s"]
        return state

    def step(i: int) -> dict:
        return _train_step(model, ema, optimizer, diffusion, settings, i, x_train, y_train)

    def log(done: int, window: list[dict]) -> str:
        row = _log_row(done, window, t0, wall_before)
        state["final_loss"] = row["loss"]
        metrics.log(row)
        return f"loss={row['loss']:.4f} lr={row['lr']:.1e}"

    def checkpoint(done: int) -> None:
        state["eval_loss"] = eval_loss(ema, diffusion, x_test, y_test, settings.seed)
        metrics.log({"step": done, "eval_loss_ema": state["eval_loss"]})
        weights = {f"model.{k}": v for k, v in model.state_dict().items()}
        weights.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        store.save(done, tensors={"weights": weights}, states={"optimizer": optimizer.state_dict()},
                   meta=snapshot(done))

    model.train()
    run_steps("pretrain digits", start=start, total=settings.steps, step=step, log=log, checkpoint=checkpoint,
              log_every=settings.log_every, ckpt_every=settings.ckpt_every, store=store,
              hint="start a new --out with a lower --lr or --grad-clip (--resume would retrace the same steps)",
              progress=progress)
    end = max(settings.steps, start)
    snapshot(end)
    files: dict[str, Path] = {}
    if export:
        files = export_bundle(out, ema, settings, state, end, NUM_TIMESTEPS)
    return TrainResult(out, end, model, ema, state["final_loss"], state["eval_loss"], state["wall_s"], files)


def _train_step(model, ema, optimizer, diffusion, settings, step, x_train, y_train) -> dict:
    lr = lr_at(settings, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(settings.seed, _STEP, step))  # also drives the label dropout
        rows = batch_indices(len(x_train), settings.batch, step, settings.seed)
        x0, y = x_train[rows], y_train[rows]                     # (B, C, H, W), (B,)
        t = torch.randint(0, diffusion.num_timesteps, (settings.batch,))
        noise = torch.randn_like(x0)
        losses = diffusion.training_losses(model, x0, t, dict(y=y), noise=noise)
    loss = losses["loss"].mean()
    value = float(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    if math.isfinite(value):
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip))
    else:
        grad_norm = float("nan")
    mse, vb = float(losses["mse"].detach().mean()), float(losses["vb"].detach().mean())
    if not math.isfinite(grad_norm):  # not applied: the loop stops the run with the last good checkpoint
        return dict(loss=value, mse=mse, vb=vb, grad_norm=grad_norm, lr=lr)
    optimizer.step()
    decay = ema_decay_at(settings, step)
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)
    return dict(loss=value, mse=mse, vb=vb, grad_norm=grad_norm, lr=lr)


@torch.no_grad()
def eval_loss(model, diffusion, x, y, seed: int, repeats: int = 2, chunk: int = 256) -> float:
    """Mean DiT loss of ``model`` (eval mode: no label dropout) on ``x``, at fixed t and noise."""
    g = torch.Generator().manual_seed(derive_seed(seed, _EVAL))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for _ in range(repeats):
            t = torch.randint(0, diffusion.num_timesteps, (len(x),), generator=g)
            noise = torch.randn(x.shape, generator=g)
            for i in range(0, len(x), chunk):
                s = slice(i, i + chunk)
                loss = diffusion.training_losses(model, x[s], t[s], dict(y=y[s]), noise=noise[s])["loss"]
                total += float(loss.sum())
                count += loss.numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _restore(store: CheckpointStore, settings: TrainSettings, model, ema, optimizer):
    ckpt = store.require()
    saved = ckpt.meta["settings"]
    for name in LOCKED:
        if saved[name] != asdict(settings)[name]:
            raise GraftError(f"--{_flag(name)} {getattr(settings, name)} differs from the checkpoint's {saved[name]} "
                             f"in {ckpt.folder}; fix: resume with the checkpoint's value or start a new --out")
    weights = ckpt.tensors("weights")
    model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}, strict=True)
    ema.load_state_dict({k[len("ema."):]: v for k, v in weights.items() if k.startswith("ema.")}, strict=True)
    optimizer.load_state_dict(ckpt.state("optimizer"))
    return ckpt.step, {k: v for k, v in ckpt.meta.items() if k != "step"}


def _log_row(step: int, window: list[dict], t0: float, wall_before: float) -> dict:
    def mean(key):
        return sum(m[key] for m in window) / len(window)

    return {"step": step, "loss": mean("loss"), "mse": mean("mse"), "vb": mean("vb"),
            "grad_norm": mean("grad_norm"), "lr": window[-1]["lr"],
            "wall_s": round(wall_before + time.perf_counter() - t0, 3)}
