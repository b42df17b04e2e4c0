"""Which path a kernel op takes (graftfx.kernels._dispatch): mode parsing and use_triton."""
import pytest
import torch

from graftfx.kernels import _dispatch
from graftfx.kernels._dispatch import kernel_mode, kernels, use_triton
from graftfx.kernels.swa import fused, sliding_window_attention
from graftfx.kernels.testing import record_calls

CPU = torch.zeros(1)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("GRAFTFX_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("mode,want", [("auto", False), ("reference", False), ("triton", True)])
def test_cpu_tensors_run_triton_only_when_asked(no_env, mode, want):
    with kernels(mode):
        assert kernel_mode() == mode
        assert use_triton(CPU) is want


def test_environment_variable_and_override(no_env, monkeypatch):
    assert kernel_mode() == "auto" and not use_triton(CPU)
    monkeypatch.setenv("GRAFTFX_KERNELS", "triton")
    assert use_triton(CPU)
    with kernels("reference"):            # the context beats the environment, and nests
        assert not use_triton(CPU)
        with kernels("triton"):
            assert use_triton(CPU)
        assert not use_triton(CPU)
    assert kernel_mode() == "triton"


def test_triton_on_cpu_needs_the_interpreter(no_env, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels("triton"):
        assert not use_triton(CPU)


def test_invalid_modes_raise(no_env, monkeypatch):
    with pytest.raises(ValueError, match="kernel mode 'cuda'"):
        with kernels("cuda"):
            pass
    assert _dispatch._override == []      # a refused mode leaves nothing behind
    monkeypatch.setenv("GRAFTFX_KERNELS", "fast")
    with pytest.raises(ValueError, match="GRAFTFX_KERNELS='fast'"):
        kernel_mode()


def test_override_is_popped_on_error(no_env):
    with pytest.raises(RuntimeError):
        with kernels("triton"):
            raise RuntimeError
    assert kernel_mode() == "auto"


@pytest.mark.parametrize("mode,want", [("auto", []), ("triton", ["swa_fwd"])])
def test_an_op_on_cpu_follows_the_mode(no_env, monkeypatch, mode, want):
    # The documented default: on a CPU "auto" runs the reference; "triton" the kernel.
    calls = record_calls(monkeypatch, fused.swa_fwd)
    q = torch.randn(1, 1, 8, 4)
    with kernels(mode):
        sliding_window_attention(q, q, q, window=2)
    assert calls == want
