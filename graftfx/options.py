"""Checks for operator config fields, called from each config's ``__post_init__``.

Each raises ``ValueError`` naming the option, the value and what it must be; the registry turns
it into a GraftError that also names the rule (``OperatorSpec.make_config``). Booleans are never
integers or numbers here (TOML ``true`` is not ``1``). No option is larger than ``MAX_INT`` /
``MAX_NUMBER`` whatever its own range (an operator's size is bounded again, against its region,
by ``graftfx.limits.check_operator_size``).
"""
from __future__ import annotations

import math

MAX_INT = 1 << 31
MAX_NUMBER = 1e9


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *,
              optional: bool = False, odd: bool = False) -> None:
    if optional and value is None:
        return
    capped = hi is None
    hi = MAX_INT if hi is None else hi
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (lo is None or value >= lo) and value <= hi and (not odd or value % 2 == 1)
    if not ok:
        what = "an odd integer" if odd else "an integer"
        over = isinstance(value, int) and not isinstance(value, bool) and value > hi
        if lo is not None and (not capped or over):
            what += f" from {lo} to {hi}"
        elif lo is not None:
            what += f" >= {lo}"
        elif over:
            what += f" <= {hi}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_number(name: str, value, *, positive: bool = False, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= MAX_NUMBER
    if not ok or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''} of at most {MAX_NUMBER:g}, "
                         f"got {value!r}")


def check_choice(name: str, value, choices, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
