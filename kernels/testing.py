"""Comparison helpers for kernel tests: relative error, named per tensor, NaN fails."""
from __future__ import annotations

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


# Tolerances by dtype for kernel-vs-fp32-reference comparisons.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
