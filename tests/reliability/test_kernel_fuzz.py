"""Random shapes and dtypes through every public kernel function on its Triton path (interpreted
on the CPU) against the plain-PyTorch reference, a quarter of them with a NaN or an infinity in
an input: values within tolerance and non-finite outputs exactly where the reference has them.
A seeded sample here (8 per kernel); GRAFTFX_RELIABILITY=full runs 200 per kernel. Every case
proves the Triton path ran (launcher call records, _kernels.launchers)."""
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
    """A Triton launcher that returns zeros (the path is taken, the values are wrong)."""
    import graftfx.kernels.swa.fused as fused

    def zeros(q, k, v, window, scale=None, **kw):
        o, lse = fused.naive_swa(q, k, v, window, scale)
        return torch.zeros_like(q), lse

    monkeypatch.setattr(fused, "swa_fwd", zeros)
    outcomes = {k.kernel_case("swa", i, h.SEED).outcome for i in range(4)}
    assert outcomes == {"silently wrong"}


def test_non_finite_outputs_must_sit_where_the_reference_has_them(monkeypatch):
    """A launcher that drops a NaN the reference propagates (or adds one) is 'silently wrong'."""
    import graftfx.kernels.swa.fused as fused

    real = fused.swa_fwd

    def finite(*args, **kw):
        o, lse = real(*args, **kw)
        return torch.nan_to_num(o), lse

    def extra_nan(*args, **kw):
        o, lse = real(*args, **kw)
        o = o.clone()
        o.view(-1)[0] = float("nan")
        return o, lse

    poisoned = [i for i in range(40) if "NaN" in k.kernel_case("swa", i, h.SEED).case.kind][:2]
    assert poisoned
    monkeypatch.setattr(fused, "swa_fwd", finite)
    assert {k.kernel_case("swa", i, h.SEED).outcome for i in poisoned} == {"silently wrong"}
    monkeypatch.setattr(fused, "swa_fwd", extra_nan)
    assert {k.kernel_case("swa", i, h.SEED).outcome for i in range(2)} == {"silently wrong"}


def test_a_case_that_never_reaches_triton_stops_the_campaign(monkeypatch):
    """The reference path taken instead of the Triton one (e.g. TRITON_INTERPRET unset, or a
    dispatch that falls back) is not a pass: the launcher records show it and the case raises."""
    import graftfx.kernels.swa.fused as fused

    monkeypatch.setattr(fused, "use_triton", lambda t: False)
    with pytest.raises(k.TritonPathNotTaken, match="swa_fwd"):
        k.kernel_case("swa", 0, h.SEED)


def test_the_campaign_refuses_kernels_imported_without_the_interpreter(tmp_path):
    """measure.py runs the campaign in a fresh process with TRITON_INTERPRET=1; a process whose
    kernel modules were imported without it (the first after.json: 1,800 '0 active drivers'
    tracebacks) refuses to produce figures."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels run compiled, without the interpreter")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, str(here / "_kernels.py"), "--n", "1", "--out", str(tmp_path / "k.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "TRITON_INTERPRET" in res.stderr, res.stderr[-2000:]
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, str(here / "_kernels.py"), "--n", "1", "--out", str(tmp_path / "k.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    data = json.loads((tmp_path / "k.json").read_text())["tally"]
    assert data["cases"] == len(k.KERNELS) and "traceback" not in data["outcomes"], data
