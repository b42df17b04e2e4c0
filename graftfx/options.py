"""Checks for operator config fields, called from each config's ``__post_init__``.

Each raises ``ValueError`` naming the option, the value and what it must be; the registry turns
it into a GraftError that also names the rule (``OperatorSpec.make_config``). Booleans are never
integers or numbers here (TOML ``true`` is not ``1``).
"""
from __future__ import annotations

import math


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *,
              optional: bool = False, odd: bool = False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi) and (not odd or value % 2 == 1)
    if not ok:
        what = "an odd integer" if odd else "an integer"
        if lo is not None and hi is not None:
            what += f" from {lo} to {hi}"
        elif lo is not None:
            what += f" >= {lo}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_number(name: str, value, *, positive: bool = False, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")


def check_choice(name: str, value, choices, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
