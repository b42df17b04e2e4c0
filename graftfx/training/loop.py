"""The step loop the three trainers share (pretrain, stage 1, stage 2).

The trainer keeps its own step (batches, forward, backward, optimizer), its own metrics row and
its own checkpoint contents; this loop owns the order around them, the same everywhere:

    for each step from ``start`` (0, or the step a resumed checkpoint holds) to ``total``:
        values = step(i)                 floats the step reports (losses, grad norm, lr, ...)
        a non-finite value stops the run: a GraftError naming the values that diverged, the
            step, and the last good checkpoint (which is left as it is)
        every ``log_every`` steps, and at every checkpoint step: log(done, window of values)
        every ``ckpt_every`` steps and at the end: checkpoint(done)

A step must not apply an update it reports as non-finite (skip ``optimizer.step()``), so the
model in memory is still the last good one when the loop stops.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from graftfx.errors import GraftError

from .checkpoint import CheckpointStore


def run_steps(name: str, *, start: int, total: int, step: Callable[[int], dict[str, float]],
              log: Callable[[int, list[dict[str, float]]], str | None], checkpoint: Callable[[int], None],
              log_every: int, ckpt_every: int, store: CheckpointStore, hint: str,
              progress: bool = True) -> dict[str, float]:
    """Run steps ``start .. total-1``; returns the values of the last step run ({} when none).

    ``log`` returns a short text for the progress bar (or None); ``store`` is where the
    trainer's checkpoints go (named in the divergence error); ``hint`` is that error's fix.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc=name, unit="step", disable=not progress, mininterval=1.0)
    window: list[dict[str, float]] = []
    last: dict[str, float] = {}
    try:
        for i in range(start, total):
            values = step(i)
            done = i + 1
            bad = [f"{k} = {v}" for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise GraftError(f"{name} diverged in step {done}: {', '.join(bad)}; {store.describe_latest()}; "
                                 f"fix: {hint}")
            window.append(values)
            last = values
            bar.update(1)
            at_checkpoint = done % ckpt_every == 0 or done == total
            if done % log_every == 0 or at_checkpoint:  # a checkpoint closes the window: a resume logs alike
                text = log(done, window)
                if text:
                    bar.set_postfix_str(text, refresh=False)
                window = []
            if at_checkpoint:
                checkpoint(done)
    finally:
        bar.close()
    return last
