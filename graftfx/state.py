"""Strict state-dict checks: one place decides whether saved tensors fit a model.

``check_state`` compares names and shapes (and, where given, dtypes) before a byte is loaded and
raises one GraftError naming what is missing, unexpected or mis-shaped, with the fix.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from graftfx.errors import GraftError


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _few(items: list[str]) -> str:
    return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")


def check_state(own: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...]], *, what: str,
                fix: str, optional: set[str] | frozenset[str] = frozenset()) -> None:
    """``own``: the model's names -> shapes; ``saved``: the file's. Names in ``optional`` may be
    absent from ``saved`` (e.g. tied tensors stored once). ``what`` names the file or model."""
    missing = sorted(k for k in own if k not in saved and k not in optional)
    unexpected = sorted(k for k in saved if k not in own)
    shapes = sorted(f"{k} {tuple(saved[k])} vs model {tuple(own[k])}" for k in own
                    if k in saved and tuple(own[k]) != tuple(saved[k]))
    parts = []
    if missing:
        parts.append(f"missing keys: {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        parts.append(f"mis-shaped keys: {_few(shapes)}")
    if parts:
        raise GraftError(f"{what} does not fit: " + "; ".join(parts) + f". Fix: {fix}")


def tied_names(module: torch.nn.Module) -> dict[str, set[str]]:
    """For each state-dict name, the other names that share its storage (safetensors stores a
    tensor shared by several names once)."""
    state = module.state_dict()
    by_ptr: dict[tuple, list[str]] = {}
    for k, v in state.items():
        key = (k,) if v.is_meta else (v.device.type, v.data_ptr(), v.dtype, tuple(v.shape))
        by_ptr.setdefault(key, []).append(k)
    return {k: set(names) - {k} for names in by_ptr.values() for k in names}
