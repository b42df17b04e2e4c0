"""Learning-rate multipliers (for ``torch.optim.lr_scheduler.LambdaLR``)."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier on the base lr at step ``step``: linear warmup over ``warmup`` steps, then
    constant or a cosine to zero at ``total``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            span = max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
        return 1.0
    return f
