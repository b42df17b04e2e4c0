"""Random shapes and dtypes through every public kernel function on its Triton path (interpreted
on the CPU) against the plain-PyTorch reference, a quarter of them with a NaN or an infinity in
an input: values within tolerance and non-finite outputs exactly where the reference has them.
A seeded sample here (8 per kernel); GRAFTFX_RELIABILITY=full runs 200 per kernel."""
import warnings

import pytest
import torch

from . import _harness as h
from . import _kernels as k


@pytest.mark.parametrize("name", k.KERNELS)
def test_kernel_matches_its_reference_on_random_shapes_dtypes_and_nan(name):
    tally = h.Tally()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # numpy inside the interpreter, on NaN inputs
        for i in range(h.sample_size(200, 8)):
            tally.add(k.kernel_case(name, i, h.SEED))
    assert not tally.bad(), tally.summary()


def test_a_wrong_kernel_is_caught(monkeypatch):
    import graftfx.kernels.swa as swa

    monkeypatch.setattr(swa, "sliding_window_attention", lambda q, k, v, w, s=None: torch.zeros_like(q))
    outcomes = {k.kernel_case("swa", i, h.SEED).outcome for i in range(4)}
    assert outcomes == {"silently wrong"}
