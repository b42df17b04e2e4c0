"""Hyena kernels against their fp32 references (graftfx.kernels.hyena.naive).

- launchers (``*_fwd``/``*_bwd``) run directly on CPU tensors under the Triton interpreter:
  every output and gradient, fp32 and bf16, awkward shapes (L = 63/255, D = 60, batch 1/3,
  a missing bias, K = 3 as well as 4);
- the public custom-op functions through ``torch.autograd.grad``, in Triton and reference mode,
  on inputs that are strided views;
- the closed-form reference backward against autograd;
- ``torch.library.opcheck`` in Triton and reference mode, and a fullgraph ``torch.compile``
  trace in Triton mode against the reference, recording which launchers ran;
- the one-line input errors.
"""
import importlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

pytest.importorskip("triton")

from graftfx.kernels import _dispatch  # noqa: E402
from graftfx.kernels.hyena import (MAX_TAPS, causal_conv1d_available, hyena_se_gate,  # noqa: E402
                                   hyena_x_gate, hyena_y_gate, mlp_hyena_x_gate, naive,
                                   short_conv)
from graftfx.kernels.testing import TOL, assert_rel_close, record_calls  # noqa: E402

hx = importlib.import_module("graftfx.kernels.hyena.hyena_x")
hy = importlib.import_module("graftfx.kernels.hyena.hyena_y")
fz = importlib.import_module("graftfx.kernels.hyena.featurize")


@dataclass(frozen=True)
class Op:
    fwd: Callable            # launcher (u, weight, bias) -> y
    bwd: Callable            # launcher (dy, u, weight, bias) -> (du, dweight, dbias)
    ref: Callable            # fp32 reference forward
    ref_bwd: Callable        # closed-form fp32 reference backward
    public: Callable         # validated custom-op function
    groups: int              # u has groups * D channels
    per_token: bool = False  # one filter per token (weight (L, K)) instead of per channel

    def weight_rows(self, length: int, d: int) -> int:
        if self.per_token:
            return length
        return d * (3 if self.ref is naive.hyena_x else 1)


OPS = {
    "short_conv": Op(fz.short_conv_fwd, fz.short_conv_bwd, naive.causal_conv,
                     lambda dy, u, w, b: naive.causal_conv_bwd(dy, u, w), short_conv, 1),
    "hyena_x": Op(hx.hyena_x_fwd, hx.hyena_x_bwd, naive.hyena_x, naive.hyena_x_bwd,
                  hyena_x_gate, 3),
    "mlp_hyena_x": Op(hx.mlp_hyena_x_fwd, hx.mlp_hyena_x_bwd, naive.mlp_hyena_x,
                      naive.mlp_hyena_x_bwd, mlp_hyena_x_gate, 3, per_token=True),
    "hyena_y": Op(hy.hyena_y_fwd, hy.hyena_y_bwd, naive.hyena_y, naive.hyena_y_bwd,
                  hyena_y_gate, 3),
}

CASES = [
    pytest.param(3, 63, 60, 4, True, id="B3-T63-D60-K4"),
    pytest.param(1, 255, 16, 3, False, id="B1-T255-D16-K3-nobias"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def make_inputs(op: Op, batch, length, d, taps, with_bias, dtype=torch.float32):
    u = torch.randn(batch, length, op.groups * d).to(dtype)
    rows = op.weight_rows(length, d)
    weight = (torch.randn(rows, taps) / taps ** 0.5).to(dtype)
    bias = (0.1 * torch.randn(rows)).to(dtype) if with_bias else None
    return u, weight, bias


def reference(op: Op, u, weight, bias, dy):
    """fp32 forward and autograd gradients on fp32 copies (a missing bias gets zeros)."""
    leaves = [u.float().requires_grad_(), weight.float().requires_grad_(),
              (torch.zeros(weight.shape[0]) if bias is None else bias.float()).requires_grad_()]
    y = op.ref(*leaves)
    return y.detach(), torch.autograd.grad(y, leaves, dy.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,length,d,taps,with_bias", CASES)
@pytest.mark.parametrize("name", list(OPS))
def test_launchers_match_reference(name, batch, length, d, taps, with_bias, dtype):
    op = OPS[name]
    u, weight, bias = make_inputs(op, batch, length, d, taps, with_bias, dtype)
    y = op.fwd(u, weight, bias)
    dy = torch.randn(y.shape).to(dtype)
    du, dw, db = op.bwd(dy, u, weight, bias)
    ref_y, (ref_du, ref_dw, ref_db) = reference(op, u, weight, bias, dy)

    assert y.dtype == dtype and du.dtype == dtype and dw.dtype == weight.dtype
    tol = TOL[dtype]
    assert_rel_close("y", y, ref_y, tol)
    assert_rel_close("du", du, ref_du, tol)
    assert_rel_close("dweight", dw, ref_dw, tol)
    assert_rel_close("dbias", db, ref_db, tol)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("name", ["hyena_x", "mlp_hyena_x", "hyena_y"])
def test_backward_sums_weight_grads_over_runs_of_tiles(name, splits, monkeypatch):
    """The backward programs sum dweight/dbias in registers over runs of row tiles: 255 rows of
    the conv axis are 4 tiles under the interpreter, walked by one program (splits=1) or by 3
    runs of 2, 2 and 0 tiles (the last program, past the end, stores zeros). Matches the
    reference, and is bitwise the same from run to run (no atomics)."""
    op = OPS[name]
    module = hy if name == "hyena_y" else hx
    seen = []

    def forced(n_tiles, programs, device):
        seen.append(n_tiles)
        return min(splits, n_tiles)

    monkeypatch.setattr(module, "row_splits", forced)
    length, d = (20, 255) if op.per_token else (255, 16)    # mlp: the conv runs over features
    u, weight, bias = make_inputs(op, 1, length, d, 4, True)
    dy = torch.randn(op.ref(u, weight, bias).shape)
    got = op.bwd(dy, u, weight, bias)
    assert seen == [4]
    _, ref = reference(op, u, weight, bias, dy)
    for label, g, r in zip(("du", "dweight", "dbias"), got, ref):
        assert_rel_close(label, g, r, TOL[torch.float32])
    if splits > 1:   # partials of several runs, added in a fixed order
        again = op.bwd(dy, u, weight, bias)
        assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.parametrize("name", list(OPS))
def test_reference_backward_matches_autograd(name):
    op = OPS[name]
    u, weight, bias = make_inputs(op, 2, 9, 5, 4, True, torch.float64)
    dy = torch.randn(op.ref(u, weight, bias).shape, dtype=torch.float64)
    _, grads = reference(op, u, weight, bias, dy)
    for label, got, ref in zip(("du", "dweight", "dbias"), op.ref_bwd(dy, u, weight, bias), grads):
        assert_rel_close(label, got, ref, 1e-6)


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("name", list(OPS))
def test_public_op_autograd(name, mode, monkeypatch):
    """The custom op through autograd, fed strided views (stride(1) != channels); in Triton
    mode both launchers must actually run."""
    op = OPS[name]
    calls = record_calls(monkeypatch, op.fwd, op.bwd)
    batch, length, d, taps = 2, 33, 24, 4
    width = op.groups * d
    u_full = torch.randn(batch, length, width + 8, requires_grad=True)
    u = u_full[..., 4:4 + width]
    rows = op.weight_rows(length, d)
    weight = (torch.randn(rows, taps) / 2).requires_grad_()
    bias = (0.1 * torch.randn(rows)).requires_grad_()
    with _dispatch.kernels(mode):
        y = op.public(u, weight, bias)
        dy = torch.randn(y.shape)
        got = torch.autograd.grad(y, (u_full, weight, bias), dy)
    assert calls == ([op.fwd.__name__, op.bwd.__name__] if mode == "triton" else [])
    ref_y, ref = reference(op, u.detach(), weight.detach(), bias.detach(), dy)
    tol = TOL[torch.float32]
    assert_rel_close("y", y, ref_y, tol)
    assert_rel_close("du", got[0][..., 4:4 + width], ref[0], tol)
    assert got[0][..., :4].abs().max() == 0 and got[0][..., 4 + width:].abs().max() == 0
    assert_rel_close("dweight", got[1], ref[1], tol)
    assert_rel_close("dbias", got[2], ref[2], tol)


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_hyena_se_gate_autograd(mode, monkeypatch):
    calls = record_calls(monkeypatch, fz.short_conv_fwd, fz.short_conv_bwd,
                         hy.hyena_y_fwd, hy.hyena_y_bwd)
    batch, length, d = 3, 63, 12
    u = torch.randn(batch, length, 3 * d, requires_grad=True)
    params = [(torch.randn(3 * d, 4) / 2), 0.1 * torch.randn(3 * d),
              (torch.randn(d, 4) / 2), 0.1 * torch.randn(d)]
    params = [p.requires_grad_() for p in params]
    with _dispatch.kernels(mode):
        y = hyena_se_gate(u, *params)
        dy = torch.randn(y.shape)
        got = torch.autograd.grad(y, (u, *params), dy)
    assert calls == (["short_conv_fwd", "hyena_y_fwd", "hyena_y_bwd", "short_conv_bwd"]
                     if mode == "triton" else [])
    leaves = [t.detach().clone().requires_grad_() for t in (u, *params)]
    ref_y = naive.hyena_se(*leaves)
    ref = torch.autograd.grad(ref_y, leaves, dy)
    tol = TOL[torch.float32]
    assert_rel_close("y", y, ref_y, tol)
    for label, g, r in zip(("du", "dfeat_weight", "dfeat_bias", "dinner_weight", "dinner_bias"),
                           got, ref):
        assert_rel_close(label, g, r, tol)


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("name", list(OPS))
def test_opcheck_custom_ops(name, mode, monkeypatch):
    """Schema, fake (shape/stride/dtype) and autograd registration of the forward and backward
    op, with and without a bias, on the path named: in Triton mode the interpreter runs the
    launchers inside every check."""
    op = OPS[name]
    calls = record_calls(monkeypatch, op.fwd, op.bwd)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    u, weight, bias = make_inputs(op, 1, 10, 6, 3, True)
    op_name = {"short_conv": "hyena_short_conv"}.get(name, f"{name}_gate")
    fwd = getattr(torch.ops.graftfx, op_name).default
    bwd = getattr(torch.ops.graftfx, f"{op_name}_bwd").default
    dy = torch.randn(op.ref(u, weight, bias).shape)
    with _dispatch.kernels(mode):
        torch.library.opcheck(fwd, (u.clone().requires_grad_(), weight.clone().requires_grad_(),
                                    bias.clone().requires_grad_()), test_utils=utils)
        torch.library.opcheck(fwd, (u, weight, None), test_utils=utils)
        torch.library.opcheck(bwd, (dy, u, weight, bias), test_utils=utils)
        torch.library.opcheck(bwd, (dy, u, weight, None), test_utils=utils)
    want = {op.fwd.__name__, op.bwd.__name__} if mode == "triton" else set()
    assert set(calls) == want


def test_compile_fullgraph_no_graph_breaks(monkeypatch):
    """The ops trace into one graph (fake kernels + autograd formulas), forward and backward;
    the compiled graph runs every launcher and matches the fp32 reference."""
    launchers = [f for op in OPS.values() for f in (op.fwd, op.bwd)]
    calls = record_calls(monkeypatch, *launchers)
    d, length = 6, 13
    u = torch.randn(1, length, 3 * d, requires_grad=True)
    wx, wy = torch.randn(3 * d, 4, requires_grad=True), torch.randn(d, 4, requires_grad=True)
    wm = torch.randn(length, 4, requires_grad=True)
    inputs = (u, wx, wy, wm)

    def f(u, wx, wy, wm):
        y = hyena_x_gate(u, wx) + hyena_y_gate(u, wy) + mlp_hyena_x_gate(u, wm)
        return (y * short_conv(y, wy)).sum()

    def f_ref(u, wx, wy, wm):
        y = naive.hyena_x(u, wx) + naive.hyena_y(u, wy) + naive.mlp_hyena_x(u, wm)
        return (y * naive.causal_conv(y, wy)).sum()

    torch._dynamo.reset()
    with _dispatch.kernels("triton"):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        loss = compiled(*inputs)
        got = torch.autograd.grad(loss, inputs)
    assert set(calls) == {f.__name__ for f in launchers}
    loss_ref = f_ref(*inputs)
    want = torch.autograd.grad(loss_ref, inputs)
    assert_rel_close("loss", loss, loss_ref, 1e-5)
    for label, g, r in zip(("du", "dwx", "dwy", "dwm"), got, want):
        assert_rel_close(label, g, r, 1e-5)


def test_empty_batch():
    u = torch.randn(0, 7, 12)
    assert hx.hyena_x_fwd(u, torch.randn(12, 4), None).shape == (0, 7, 4)
    du, dw, db = hy.hyena_y_bwd(torch.randn(0, 7, 4), u, torch.randn(4, 4), None)
    assert du.shape == u.shape and dw.abs().sum() == 0 and db.shape == (4,)


@pytest.mark.parametrize("call,arg", [
    pytest.param(lambda: hyena_x_gate(torch.randn(4, 12), torch.randn(12, 4)), "u", id="u-2d"),
    pytest.param(lambda: hyena_x_gate(torch.randn(2, 4, 10), torch.randn(10, 4)), "u",
                 id="u-not-3-groups"),
    pytest.param(lambda: hyena_x_gate(torch.randint(0, 3, (2, 4, 12)), torch.randn(12, 4)), "u",
                 id="u-int"),
    pytest.param(lambda: hyena_x_gate(torch.randn(2, 4, 12), torch.randn(4, 4)), "weight",
                 id="weight-rows"),
    pytest.param(lambda: hyena_x_gate(torch.randn(2, 4, 12), torch.randn(12, 1, 4)), "weight",
                 id="weight-3d"),
    pytest.param(lambda: hyena_y_gate(torch.randn(2, 4, 12), torch.randn(4, MAX_TAPS + 1)),
                 "weight", id="weight-taps"),
    pytest.param(lambda: hyena_y_gate(torch.randn(2, 4, 12), torch.randn(4, 4), torch.randn(5)),
                 "bias", id="bias-shape"),
    pytest.param(lambda: mlp_hyena_x_gate(torch.randn(2, 4, 6), torch.randn(4, 4)), "u",
                 id="mlp-features-lt-taps"),
    pytest.param(lambda: mlp_hyena_x_gate(torch.randn(2, 4, 12), torch.randn(12, 4)), "weight",
                 id="mlp-weight-per-token"),
    pytest.param(lambda: short_conv(torch.randn(2, 4, 6), torch.randn(6, 4), backend="cuda"),
                 "backend", id="backend-name"),
    pytest.param(lambda: hyena_se_gate(torch.randn(2, 4, 12), torch.randn(4, 4), None,
                                       torch.randn(4, 4)), "feat_weight", id="se-feat-weight"),
])
def test_input_errors_name_the_argument(call, arg):
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert message.startswith(arg) or f"{arg}=" in message, message
    assert "\n" not in message


def test_causal_conv1d_backend_is_optional():
    u, w = torch.randn(2, 5, 6), torch.randn(6, 4)
    if causal_conv1d_available():
        pytest.skip("causal_conv1d is installed here")
    with pytest.raises(ValueError, match="causal_conv1d"):
        short_conv(u, w, backend="causal_conv1d")
    with _dispatch.kernels("reference"):
        assert_rel_close("y", short_conv(u, w), naive.causal_conv(u, w), 1e-6)
