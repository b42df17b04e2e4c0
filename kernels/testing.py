"""Helpers for kernel tests: relative error, named per tensor, NaN fails; which path an op took."""
from __future__ import annotations

import functools
import sys

import torch


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / max(||ref||, tiny), both in fp64."""
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def assert_rel_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Assert ``got`` matches ``ref`` to relative error ``tol``; the message names the tensor."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: kernel output has NaN/inf"
    assert torch.isfinite(ref).all(), f"{name}: reference has NaN/inf (bad test inputs)"
    err = rel_err(got, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def record_calls(monkeypatch, *launchers) -> list[str]:
    """Wrap each launcher (e.g. ``fused.swa_fwd``) in its defining module, where the custom ops
    look it up, and return the list of launcher names called from then on: the proof that an
    op took the Triton path (``kernels("triton")``) or did not (``kernels("reference")``).
    ``monkeypatch`` is pytest's fixture; the originals come back when the test ends."""
    calls: list[str] = []
    for fn in launchers:
        @functools.wraps(fn)
        def recorded(*args, _fn=fn, **kwargs):
            calls.append(_fn.__name__)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(sys.modules[fn.__module__], fn.__name__, recorded)
    return calls


# The torch.library.opcheck utilities that depend on the path an op takes: does the kernel
# mutate or alias its inputs, do its outputs match the fake's shape/stride/dtype, is autograd
# registered. The AOT-dispatch checks compare an op with itself through a trace, the same on
# either path: kernel tests run them on the reference path, where they are cheap.
# Keyed by kernel mode: ``opcheck(op, args, test_utils=OPCHECK_UTILS[mode])``.
_PATH_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
OPCHECK_UTILS = {"triton": _PATH_UTILS, "reference": _PATH_UTILS + ("test_aot_dispatch_dynamic",)}

# Tolerances by dtype for kernel-vs-fp32-reference comparisons.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
