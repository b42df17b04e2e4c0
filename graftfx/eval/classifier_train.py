"""Training the digit classifier behind Digits-FID, and its card.

``train_classifier`` trains ``DigitClassifier`` on the fixed train split with light augmentation
(random rotation +-12 degrees, scale 0.9..1.1, shift of up to one pixel), seeded, on the CPU,
measures accuracy on the held-out test split and Digits-FID of reference sets under the new
classifier, and writes ``classifier.safetensors`` and ``classifier.md``.
"""
from __future__ import annotations

import contextlib
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graftfx.errors import GraftError
from graftfx.io import atomic_write_text

from .classifier import DigitClassifier, file_digest, save_classifier
from .digits import digits_fid


def augment(x: torch.Tensor, generator: torch.Generator, max_degrees: float = 12.0,
            scale: tuple[float, float] = (0.9, 1.1), max_shift: int = 1) -> torch.Tensor:
    """Random rotation, scale and integer-pixel shift of digits (N, 1, H, W) in [-1, 1]."""
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
    s = scale[0] + torch.rand(n, generator=generator) * (scale[1] - scale[0])
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s  # output -> input coordinates
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0] * 2 / w], 1),
                         torch.stack([sin, cos, shift[:, 1] * 2 / h], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ink = F.grid_sample((x + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return ink * 2 - 1  # background (outside the image) stays -1


@dataclass
class TrainResult:
    """What ``train_classifier`` produced and measured."""

    model: DigitClassifier
    test_accuracy: float
    per_class_accuracy: list[float]
    train_accuracy: float
    steps: int
    batch_size: int
    lr: float
    seed: int
    seconds: float
    n_train: int
    n_test: int
    files: dict[str, Path] = field(default_factory=dict)
    sanity_fid: dict[str, float] = field(default_factory=dict)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[float]]:
    with torch.no_grad():
        pred = model(x).argmax(1)
    correct = (pred == y).double()
    per_class = [float(correct[y == c].mean()) for c in range(int(y.max()) + 1)]
    return float(correct.mean()), per_class


def train_classifier(out=None, *, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3,
                     weight_decay: float = 1e-4, seed: int = 0, progress: bool = True,
                     command: str | None = None) -> TrainResult:
    """Train the digit classifier on the fixed train split; measure it on the test split.

    With ``out`` (a folder) writes ``classifier.safetensors`` and its card ``classifier.md``
    there, atomically. AdamW with a 50-step warm-up then cosine decay, cross-entropy with label
    smoothing 0.05, dropout 0.1, on one CPU thread. Seeded: the global RNG is forked, so callers'
    RNG state is kept.
    """
    from graftfx.data import digits_split

    if steps < 1 or batch_size < 1 or not lr > 0:
        raise GraftError(f"train_classifier: steps={steps}, batch_size={batch_size}, lr={lr} must all be positive")
    (x_train, y_train), (x_test, y_test) = digits_split()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), _cpu_settings():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DigitClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        warmup = min(50, steps)

        def lr_at(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        order = torch.randperm(len(x_train), generator=gen)
        cursor = 0
        bar = _bar(steps, progress)
        model.train()
        for _ in range(steps):
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(x_train), generator=gen), 0
            idx = order[cursor:cursor + batch_size]
            cursor += batch_size
            x = augment(x_train[idx], gen)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    test_acc, per_class = _accuracy(model, x_test, y_test)
    train_acc, _ = _accuracy(model, x_train, y_train)
    result = TrainResult(model=model, test_accuracy=test_acc, per_class_accuracy=per_class, train_accuracy=train_acc,
                         steps=steps, batch_size=batch_size, lr=lr, seed=seed, seconds=seconds,
                         n_train=len(x_train), n_test=len(x_test))
    result.sanity_fid = _sanity_fid(model, seed)
    if out is not None:
        out = Path(out)
        weights = save_classifier(model, out / "classifier.safetensors",
                                  {"seed": str(seed), "steps": str(steps), "test_accuracy": f"{test_acc:.6f}"})
        text = _card(result, weights, command or _default_command(out, result))
        card = atomic_write_text(out / "classifier.md", text)
        result.files = {"weights": weights, "card": card}
    return result


@contextlib.contextmanager
def _cpu_settings():
    """One intra-op thread and denormals flushed to zero while training, then the defaults back.

    The model is tiny, so threads cost more than they give (4x slower with 2 threads on a busy
    2-core machine), and the flush (a per-thread CPU flag, hence the single thread) avoids the
    slow denormal arithmetic of the late, near-zero gradients.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="classifier", unit="step", disable=not enabled)


def _sanity_fid(model: DigitClassifier, seed: int) -> dict[str, float]:
    """Digits-FID of reference sets under this classifier, to calibrate what numbers mean."""
    from graftfx.data import digits_dataset, digits_split

    (x_train, _), (x_test, _) = digits_split()
    x_all, _ = digits_dataset()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(len(x_test), 1, 8, 8, generator=gen) * 2 - 1
    ref = x_all
    return {"train split (1438) vs full set": digits_fid(x_train, ref, classifier=model),
            "test split (359) vs full set": digits_fid(x_test, ref, classifier=model),
            "uniform noise (359) vs full set": digits_fid(noise, ref, classifier=model)}


def _default_command(out: Path, r: TrainResult) -> str:
    return (f"graftfx eval train-classifier --out {out} --steps {r.steps} --batch-size {r.batch_size} "
            f"--lr {r.lr:g} --seed {r.seed}")


def _card(r: TrainResult, weights: Path, command: str) -> str:
    n_params = sum(p.numel() for p in r.model.parameters())
    per_class = " | ".join(f"{a:.3f}" for a in r.per_class_accuracy)
    fids = "\n".join(f"| {name} | {value:.3f} |" for name, value in r.sanity_fid.items())
    return f"""# Digit classifier (Digits-FID feature extractor)

Made by `{command}` (graftfx.eval.classifier_train.train_classifier); every number below was measured
by that run.

## Architecture

`DigitClassifier`: conv 3x3 1->{r.model.channels[0]} + ReLU; conv 3x3 {r.model.channels[0]}->{r.model.channels[1]} + ReLU + max-pool 2
(8x8 -> 4x4); conv 3x3 {r.model.channels[1]}->{r.model.channels[2]} + ReLU + max-pool 2 (-> 2x2); linear
{4 * r.model.channels[2]} -> {r.model.feature_dim} + ReLU (the **feature layer**: Digits-FID uses these {r.model.feature_dim} dims); dropout 0.1;
linear {r.model.feature_dim} -> 10. {n_params:,} parameters, float32, safetensors
(`{weights.name}`, {weights.stat().st_size:,} bytes, sha256 {file_digest(weights)}...).
Input: (N, 1, 8, 8) in [-1, 1], clamped to that range.

## Data

scikit-learn's `load_digits` (1,797 8x8 images, 10 classes), pixels 0..16 mapped to [-1, 1],
through `graftfx.data.digits_split()` (fixed split, seed 0): {r.n_train} train, {r.n_test} test.
Trained on the train split only; augmentation: rotation +-12 degrees, scale 0.9..1.1,
shift up to 1 pixel (bilinear, background -1).

## Training

AdamW (lr {r.lr:g}, weight decay 1e-4), 50-step linear warm-up then cosine decay, batch
{r.batch_size}, {r.steps} steps, cross-entropy with label smoothing 0.05, seed {r.seed}, CPU,
torch {torch.__version__}, one intra-op thread, Python {platform.python_version()}.
Wall time: {r.seconds:.1f} s.

## Results (measured by this run)

- Held-out test accuracy: **{r.test_accuracy:.4f}** ({r.n_test} images)
- Train accuracy (no augmentation): {r.train_accuracy:.4f}
- Test accuracy per class 0..9: {per_class}

Digits-FID under this classifier (default reference: the full real set, 1,797 images), to
calibrate what a number means:

| samples | Digits-FID |
|---|---|
{fids}
"""
