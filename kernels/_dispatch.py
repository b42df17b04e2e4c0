"""Which path a kernel op takes: the Triton kernel or the PyTorch reference.

``GRAFTFX_KERNELS`` = ``auto`` (default: Triton on CUDA tensors, reference on CPU),
``triton`` (Triton everywhere; on a CPU this needs ``TRITON_INTERPRET=1``), or
``reference`` (always the fp32-accurate PyTorch reference). Kernel tests call the
``<op>_fwd``/``<op>_bwd`` launchers directly under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
_MODES = ("auto", "triton", "reference")
_override: list[str] = []


def kernel_mode() -> str:
    mode = _override[-1] if _override else os.environ.get("GRAFTFX_KERNELS", "auto")
    if mode not in _MODES:
        raise ValueError(f"GRAFTFX_KERNELS={mode!r} is not one of {', '.join(_MODES)}")
    return mode


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor ``t`` should run its Triton kernel."""
    mode = kernel_mode()
    if mode == "reference" or not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return mode == "triton" and t.device.type == "cpu" and interpreting()


@contextlib.contextmanager
def kernels(mode: str):
    """``with kernels("reference"): ...`` picks the path for the ops run inside."""
    if mode not in _MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {', '.join(_MODES)}")
    _override.append(mode)
    try:
        yield
    finally:
        _override.pop()


def optional_backend(module: str) -> bool:
    """True when an optional backend package (flash_attn, mamba_ssm, causal_conv1d) imports."""
    return importlib.util.find_spec(module) is not None
