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
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    The one key for every interpreter-only workaround in the kernels (fp32 operands for the
    interpreter's bf16 ``tl.dot``, one small autotune config, CPU-sized tiles): ``@triton.jit``
    reads the same variable when a kernel module is imported, so this is exactly when the
    kernels are interpreted, whatever device a tensor is on.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(t: torch.Tensor):
    """Context for a launch on ``t``'s GPU: Triton launches on the *current* CUDA device (and
    its current stream), which need not be the tensor's. A no-op off CUDA."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill: the GPU's own count; 4 under the interpreter (a few
    programs, so multi-program paths are exercised); 132 (H100/H200 SXM) for a static compile."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4 if interpreting() else 132


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
