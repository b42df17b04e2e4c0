"""Timing, the device's measured ceilings, and the facts every report header carries.

Timers:

- CUDA: ``triton.testing.do_bench``: CUDA-event time of each call, the L2 cache flushed
  before each, gradients reset to None before each; we report the median (and the minimum).
- CPU: a plain median timer: one warm-up call (or more, up to ``warmup_ms``), then
  ``time.perf_counter`` around each call until ``rep_ms`` have passed (at least 3 calls).

Ceilings are measured, never looked up: a large device copy (bytes read + written per
second) and a large dense matmul in the run's dtype (2*n^3 FLOPs per second).
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from graftfx.errors import GraftError

MIN_REPS = 3
MAX_REPS = 10_000
# ceiling probes: bytes copied and matmul size per device type
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 25}
MATMUL_N = {"cuda": 8192, "cpu": 1024}


@dataclass
class Timing:
    ms: float                 # median milliseconds per call
    ms_min: float             # fastest call
    reps: int | None          # timed calls (None: do_bench does not say)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` = the first CUDA device when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise GraftError(f"--device {name!r} is not a device; use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise GraftError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    return torch.device(name)


def time_callable(fn: Callable[[], object], device: torch.device | str = "cpu", *,
                  warmup_ms: float = 25.0, rep_ms: float = 100.0,
                  grad_to_none: Iterable[torch.Tensor] | None = None) -> Timing:
    """Median milliseconds per call of ``fn()`` on ``device`` (see the module notes)."""
    if not callable(fn):
        raise TypeError(f"time_callable needs a callable, got {type(fn).__name__}")
    if warmup_ms < 0 or rep_ms <= 0:
        raise ValueError(f"warmup_ms must be >= 0 and rep_ms > 0, got {warmup_ms}, {rep_ms}")
    device = torch.device(device)
    grads = list(grad_to_none or ())
    if device.type == "cuda":
        return _cuda_timing(fn, warmup_ms, rep_ms, grads)
    return _cpu_timing(fn, warmup_ms, rep_ms, grads)


def _cuda_timing(fn, warmup_ms: float, rep_ms: float, grads: list) -> Timing:
    from triton.testing import do_bench

    median, fastest = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads or None,
                               quantiles=[0.5, 0.0])
    return Timing(float(median), float(fastest), None)


def _cpu_timing(fn, warmup_ms: float, rep_ms: float, grads: list) -> Timing:
    def clear():
        for t in grads:
            t.grad = None

    clear()
    fn()                                   # first call: allocations, lazy init, compilation
    stop = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < stop:
        clear()
        fn()
    times: list[float] = []
    stop = time.perf_counter() + rep_ms / 1e3
    while len(times) < MIN_REPS or (time.perf_counter() < stop and len(times) < MAX_REPS):
        clear()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times) * 1e3, min(times) * 1e3, len(times))


@dataclass
class Ceilings:
    gbps: float               # large device copy: (read + written bytes) / s / 1e9
    tflops: float             # dense n x n x n matmul in `dtype`: 2 n^3 / s / 1e12
    copy_bytes: int           # bytes read by the copy probe (as many written)
    matmul_n: int
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        return (f"copy {self.gbps:,.1f} GB/s ({self.copy_bytes >> 20} MiB read + written), "
                f"matmul {self.tflops:,.2f} TFLOP/s ({self.matmul_n}^3 {self.dtype})")


def measure_ceilings(device: torch.device | str, dtype: torch.dtype, *, warmup_ms: float = 25.0,
                     rep_ms: float = 100.0) -> Ceilings:
    """Time a large copy and a large matmul on ``device`` (sizes in COPY_BYTES / MATMUL_N)."""
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    nbytes, n = COPY_BYTES[kind], MATMUL_N[kind]
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    copy = time_callable(lambda: dst.copy_(src), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    del src, dst
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = time_callable(lambda: torch.mm(a, b), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return Ceilings(gbps=2 * nbytes / (copy.ms * 1e-3) / 1e9,
                    tflops=2 * n ** 3 / (mm.ms * 1e-3) / 1e12,
                    copy_bytes=nbytes, matmul_n=n, dtype=dtype_name(dtype))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}.get(dtype, str(dtype).replace("torch.", ""))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine() or "CPU"
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def environment(device: torch.device, command: str) -> dict:
    """Device, date, versions and the command: what every report header states."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": device_name(device), "device_type": device.type,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "command": command}
