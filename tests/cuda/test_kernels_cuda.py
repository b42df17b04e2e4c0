"""Every kernel family on a CUDA GPU at the real shapes, against its fp32 reference (naive.py).

Skipped (and counted as skipped) without CUDA. Shapes from ``graftfx.kernels.cases``: head dim
72, L = 4096 and 16384, batch 8 x 16 heads = 128 (B*H); the paper's Mamba-2 (d_state 64,
headdim 16, 144 heads); Hyena on the (B, L, 3456) in-projection output. q/k/v are head views of
one packed projection, as the operators hand them over. Each case runs the public function (the
custom op with autograd) forward and backward in bf16, fp16 and fp32, and compares the output
and the gradient of every input by relative error with the reference on fp32 copies; the dense
attention references see batch element 0 and two heads (``KernelCase.ref_slice``). Mamba-2 runs
one batch element, so its A/D gradients (sums over the batch) compare too. Inputs are fresh
random draws; outputs must be finite.

Run on the GPU machine through ``benchmarks/gpu_check.sh``.
"""
from __future__ import annotations

import pytest
import torch

from graftfx.kernels import cases as kc
from graftfx.kernels._dispatch import kernels
from graftfx.kernels.testing import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}
DTYPES = ("bf16", "fp16", "fp32")


def _cases():
    out = []
    for L in kc.LENGTHS:
        side = int(L ** 0.5)
        out += [kc.swa_case(L, 72), kc.nat2d_case(side, 72), kc.linear_attn_case(L, 72),
                kc.mamba2_case(L, B=1), kc.hyena_x_case(L), kc.hyena_y_case(L), kc.short_conv_case(L)]
    return out


CASES = _cases()


def _check(name, got, want, tol):
    assert torch.isfinite(got).all(), f"{name}: NaN/inf"
    err = rel_err(got, want)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    return err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_kernel_matches_reference(case, dtype):
    dev = torch.device("cuda")
    raw = case.make(dev, kc.DTYPES[dtype], seed=torch.randint(0, 2**31, ()).item())
    x = {k: (v.detach().requires_grad_() if k in case.grads else v) for k, v in raw.items()}
    with kernels("triton"):
        y = case.run(x)
    torch.cuda.synchronize()
    cot = torch.randn(y.shape, device=dev, dtype=torch.float32)
    names = [k for k in case.grads if k in x]
    got = torch.autograd.grad(y, [x[k] for k in names], cot.to(y.dtype))

    sl = case.ref_slice or (lambda name, t: t)
    ref_in = {k: sl(k, v.detach()).float().requires_grad_(k in names) for k, v in raw.items()}
    if case.ref_inputs is not None:
        ref_in = case.ref_inputs(ref_in)
    y_ref = case.reference(ref_in)
    want = torch.autograd.grad(y_ref, [ref_in[k] for k in names], sl("out", cot))
    tol = TOL[dtype]
    _check("out", sl("out", y.detach()).float(), y_ref.detach(), tol)
    for k, g, w in zip(names, got, want):
        _check(f"d{k}", sl(k, g).float(), w, 2 * tol)
