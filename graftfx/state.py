"""Strict state-dict checks: one place decides whether saved tensors fit a model.

``check_state`` compares names and shapes (and, where given, dtypes) before a byte is loaded and
raises one GraftError naming what is missing, unexpected, mis-shaped or of the wrong dtype, with
the fix. Floating-point tensors load into float32/float16/bfloat16 parameters (a precision change);
an integer, boolean, float64 or float8 tensor never loads into a floating-point parameter (it
would load without a word and compute something else), nor the other way round.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from graftfx.errors import GraftError


FLOATS = frozenset({"float32", "float16", "bfloat16"})
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64"}


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def dtypes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()}


def dtype_fits(own: str, saved: str) -> bool:
    return own == saved or (own in FLOATS and saved in FLOATS)


def safetensors_header(path, what: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names -> shapes and names -> dtypes of a safetensors file, read from its header only."""
    from safetensors import SafetensorError, safe_open

    from graftfx.errors import first_line

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
            dtypes = {k: _ST_DTYPES.get(v.get_dtype(), v.get_dtype().lower()) for k, v in slices.items()}
    except FileNotFoundError:
        raise GraftError(f"{what} not found") from None
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise GraftError(f"{what} is not a readable safetensors file ({first_line(e)}); write it again") from None
    return shapes, dtypes


def _few(items: list[str]) -> str:
    return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")


def check_state(own: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...]], *, what: str,
                fix: str, optional: set[str] | frozenset[str] = frozenset(),
                own_dtypes: Mapping[str, str] | None = None, saved_dtypes: Mapping[str, str] | None = None) -> None:
    """``own``: the model's names -> shapes; ``saved``: the file's. Names in ``optional`` may be
    absent from ``saved`` (e.g. tied tensors stored once). ``what`` names the file or model.
    With ``own_dtypes`` and ``saved_dtypes`` (names -> dtype names, ``dtypes_of``) dtypes are
    checked too (``dtype_fits``)."""
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
    if own_dtypes is not None and saved_dtypes is not None:
        wrong = sorted(f"{k} {saved_dtypes[k]} vs model {own_dtypes[k]}" for k in own_dtypes
                       if k in saved_dtypes and not dtype_fits(own_dtypes[k], saved_dtypes[k]))
        if wrong:
            parts.append(f"keys of the wrong dtype: {_few(wrong)}")
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


def detach_from(module: torch.nn.Module, other: torch.nn.Module) -> None:
    """Give ``module`` its own copies of every submodule, parameter and buffer it shares with
    ``other`` (splicing shares the base model's untouched modules), so loading weights into it
    never writes into ``other``."""
    import copy

    theirs = {id(m) for m in other.modules()}

    def copy_shared(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if id(child) in theirs:
                setattr(parent, name, copy.deepcopy(child))
            else:
                copy_shared(child)

    copy_shared(module)
    tensors = {id(p) for p in other.parameters()} | {id(b) for b in other.buffers()}
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if id(p) in tensors:
                setattr(sub, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            if id(b) in tensors:
                sub.register_buffer(name, b.detach().clone(), persistent=name not in sub._non_persistent_buffers_set)
