"""Pretrain a DiT on scikit-learn's 8x8 digits with the DiT diffusion loss.

Every step draws its batch, timesteps, noise and label dropout from a seed derived from
``(seed, step)`` alone, so a run is reproducible from its seed and ``--resume`` from a
checkpoint continues exactly as the uninterrupted run would have (bit for bit on the CPU with the
same thread count). The learning rate warms up linearly and then stays constant, so a run can be
extended with ``--resume --steps MORE`` without changing the steps already taken.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from graftfx.data import DIGITS_CONFIG, digits_split
from graftfx.errors import GraftError
from graftfx.models import DiT, DiTConfig, GaussianDiffusion

from .card import export_bundle
from .checkpoint import latest_step, load_checkpoint, save_checkpoint
from graftfx.io import atomic_write_text

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


def resolve_settings(out, given: dict, resume: bool) -> TrainSettings:
    """Settings from the flags given; with ``resume``, unspecified ones come from the checkpoint."""
    given = {k: v for k, v in given.items() if v is not None}
    if not resume:
        return TrainSettings(**given)
    saved = load_checkpoint(Path(out) / "checkpoints").state["settings"]
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
    ckpt_root = out / "checkpoints"
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
    start = 0
    if resume:
        start, state = _restore(ckpt_root, settings, model, ema, optimizer)
        _truncate_metrics(out / "metrics.jsonl", start)
    elif latest_step(ckpt_root) is not None:
        raise GraftError(f"{out} already holds a training run (checkpoint at step {latest_step(ckpt_root)}); "
                         "fix: pass --resume to continue it, or choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.jsonl", "")

    run = {"command": command, "start_step": start, "end_step": start, "wall_s": 0.0,
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    state["runs"] = list(state["runs"]) + [run]
    state["settings"] = asdict(settings)
    state["train_size"] = len(x_train)
    t0 = time.perf_counter()
    wall_before = float(state["wall_s"])
    window: list[dict] = []

    def snapshot(step):
        run["end_step"] = step
        run["wall_s"] = time.perf_counter() - t0
        state["wall_s"] = wall_before + run["wall_s"]
        return state

    from tqdm.auto import tqdm

    bar = tqdm(total=settings.steps, initial=start, desc="pretrain digits", unit="step", disable=not progress,
               mininterval=1.0)
    model.train()
    try:
        for step in range(start, settings.steps):
            metrics = _train_step(model, ema, optimizer, diffusion, settings, step, x_train, y_train)
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                last = latest_step(ckpt_root)
                kept = f"the last good checkpoint (step {last}) is kept in {ckpt_root}" if last is not None \
                    else "no checkpoint was written yet"
                raise GraftError(f"training loss became {metrics['loss']} (grad norm {metrics['grad_norm']}) at step "
                                 f"{step}; {kept}; fix: lower --lr or --grad-clip and start again, or --resume")
            window.append(metrics)
            bar.update(1)
            done = step + 1
            at_ckpt = done % settings.ckpt_every == 0 or done == settings.steps
            if done % settings.log_every == 0 or at_ckpt:  # a checkpoint closes the window: resumes log alike
                row = _log_row(done, window, t0, wall_before)
                state["final_loss"] = row["loss"]
                _append_metrics(out / "metrics.jsonl", row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.1e}")
                window = []
            if at_ckpt:
                state["eval_loss"] = eval_loss(ema, diffusion, x_test, y_test, settings.seed)
                _append_metrics(out / "metrics.jsonl", {"step": done, "eval_loss_ema": state["eval_loss"]})
                save_checkpoint(ckpt_root, done, model, ema, optimizer, snapshot(done), keep=settings.keep)
    finally:
        bar.close()
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
    if not math.isfinite(grad_norm):
        return dict(loss=value, mse=float("nan"), vb=float("nan"), grad_norm=grad_norm, lr=lr)
    optimizer.step()
    decay = ema_decay_at(settings, step)
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)
    return dict(loss=value, mse=float(losses["mse"].detach().mean()), vb=float(losses["vb"].detach().mean()),
                grad_norm=grad_norm, lr=lr)


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


def _restore(ckpt_root: Path, settings: TrainSettings, model, ema, optimizer):
    ckpt = load_checkpoint(ckpt_root)
    saved = ckpt.state["settings"]
    for name in LOCKED:
        if saved[name] != asdict(settings)[name]:
            raise GraftError(f"--{_flag(name)} {getattr(settings, name)} differs from the checkpoint's {saved[name]} "
                             f"in {ckpt.folder}; fix: resume with the checkpoint's value or start a new --out")
    model.load_state_dict(ckpt.model, strict=True)
    ema.load_state_dict(ckpt.ema, strict=True)
    optimizer.load_state_dict({"state": ckpt.optimizer_state,
                               "param_groups": optimizer.state_dict()["param_groups"]})
    return ckpt.step, ckpt.state


def _log_row(step: int, window: list[dict], t0: float, wall_before: float) -> dict:
    def mean(key):
        return sum(m[key] for m in window) / len(window)

    return {"step": step, "loss": mean("loss"), "mse": mean("mse"), "vb": mean("vb"),
            "grad_norm": mean("grad_norm"), "lr": window[-1]["lr"],
            "wall_s": round(wall_before + time.perf_counter() - t0, 3)}


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (they will be logged again)."""
    if not path.is_file():
        atomic_write_text(path, "")
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
