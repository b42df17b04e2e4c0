"""Non-causal linear attention: Triton kernels (interpreted on the CPU) vs the fp32 reference.

Every output and gradient is compared by relative error against ``naive.linear_attn_ref`` run
in fp32 on fp32 copies of the inputs, with gradients from autograd.
"""
import pytest
import torch

from graftfx.kernels._dispatch import kernels
from graftfx.kernels.linear_attn import (linear_attention, linear_attn_bwd, linear_attn_bwd_ref,
                                         linear_attn_fwd, linear_attn_op, linear_attn_ref)
from graftfx.kernels.linear_attn import noncausal
from graftfx.kernels.linear_attn.noncausal import linear_attn_bwd_op
from graftfx.kernels.testing import OPCHECK_UTILS, TOL, assert_rel_close, record_calls

# (B, H, L, Dk, Dv, feature_map). L=63: one ragged block; L=255: several blocks and L-chunks
# (two-stage state reduction); Dk=60: padded head dim; Dv=100: two Dv tiles.
CASES = [
    pytest.param(1, 2, 63, 60, 60, "elu", id="B1-T63-H2-D60-elu"),
    pytest.param(3, 1, 63, 60, 60, "relu", id="B3-T63-H1-D60-relu"),
    pytest.param(1, 1, 255, 32, 32, "elu", id="B1-T255-H1-D32-elu"),
    pytest.param(3, 2, 255, 16, 16, "relu", id="B3-T255-H2-D16-relu"),
    pytest.param(1, 1, 63, 32, 100, "elu", id="B1-T63-H1-Dk32-Dv100-elu"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _inputs(B, H, L, dk, dv, dtype):
    q = torch.randn(B, H, L, dk).to(dtype)
    k = torch.randn(B, H, L, dk).to(dtype)
    v = torch.randn(B, H, L, dv).to(dtype)
    do = torch.randn(B, H, L, dv).to(dtype)
    return q, k, v, do


def _reference(q, k, v, do, feature_map, eps=1e-6):
    """fp32 output and autograd gradients of the reference, on fp32 copies of the inputs."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    o = linear_attn_ref(qf, kf, vf, feature_map, eps)
    grads = torch.autograd.grad(o, (qf, kf, vf), do.float())
    return o.detach(), grads


def _check(o, grads, o_ref, grads_ref, dtype):
    tol = TOL[dtype]
    assert_rel_close("o", o, o_ref, tol)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype} != input dtype {dtype}"
        assert_rel_close(name, g, g_ref, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,L,dk,dv,feature_map", CASES)
def test_launchers_match_reference(B, H, L, dk, dv, feature_map, dtype):
    q, k, v, do = _inputs(B, H, L, dk, dv, dtype)
    o_ref, grads_ref = _reference(q, k, v, do, feature_map)
    o = linear_attn_fwd(q, k, v, feature_map, 1e-6)
    assert o.dtype == dtype
    grads = linear_attn_bwd(do, q, k, v, feature_map, 1e-6)
    _check(o, grads, o_ref, grads_ref, dtype)


def test_launchers_fp16():
    q, k, v, do = _inputs(1, 2, 63, 60, 60, torch.float16)
    o_ref, grads_ref = _reference(q, k, v, do, "elu")
    o = linear_attn_fwd(q, k, v, "elu", 1e-6)
    _check(o, linear_attn_bwd(do, q, k, v, "elu", 1e-6), o_ref, grads_ref, torch.float16)


def test_launchers_strided_inputs():
    """q, k, v as views of one (B, L, 3, H, D) projection, the layout an operator produces."""
    B, L, H, D = 3, 63, 2, 60
    qkv = torch.randn(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    do = torch.randn(B, H, L, D).transpose(2, 3).contiguous().transpose(2, 3)  # unit stride lost
    o_ref, grads_ref = _reference(q, k, v, do, "elu")
    o = linear_attn_fwd(q, k, v, "elu", 1e-6)
    _check(o, linear_attn_bwd(do, q, k, v, "elu", 1e-6), o_ref, grads_ref, torch.float32)


def test_relu_rows_with_no_features():
    """relu(q_i) = 0 for a whole row: the normaliser is eps and the row's output and dq are 0."""
    q, k, v, do = _inputs(1, 1, 63, 16, 16, torch.float32)
    q[..., :5, :] = -q[..., :5, :].abs() - 0.1
    o_ref, grads_ref = _reference(q, k, v, do, "relu", eps=1e-3)
    o = linear_attn_fwd(q, k, v, "relu", 1e-3)
    _check(o, linear_attn_bwd(do, q, k, v, "relu", 1e-3), o_ref, grads_ref, torch.float32)
    assert o[..., :5, :].abs().max() == 0


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_closed_form_backward_matches_autograd(feature_map):
    q, k, v, do = _inputs(3, 2, 255, 60, 40, torch.float32)
    _, grads_ref = _reference(q, k, v, do, feature_map)
    for name, g, g_ref in zip(("dq", "dk", "dv"), linear_attn_bwd_ref(do, q, k, v, feature_map), grads_ref):
        assert_rel_close(name, g, g_ref, 1e-5)


def _op_grads(q, k, v, do, feature_map):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = linear_attention(*leaves, feature_map=feature_map)
    return o.detach(), torch.autograd.grad(o, leaves, do)


def _record(monkeypatch):
    """Calls of the two launchers from now on: which path the custom op took."""
    return record_calls(monkeypatch, noncausal.linear_attn_fwd, noncausal.linear_attn_bwd)


LAUNCHERS = ["linear_attn_fwd", "linear_attn_bwd"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,L,dk,dv,feature_map", [CASES[1], CASES[2]])
def test_op_autograd_triton_path(B, H, L, dk, dv, feature_map, dtype, monkeypatch):
    calls = _record(monkeypatch)
    q, k, v, do = _inputs(B, H, L, dk, dv, dtype)
    o_ref, grads_ref = _reference(q, k, v, do, feature_map)
    with kernels("triton"):
        o, grads = _op_grads(q, k, v, do, feature_map)
    assert calls == LAUNCHERS
    _check(o, grads, o_ref, grads_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_autograd_reference_path(dtype, monkeypatch):
    calls = _record(monkeypatch)
    q, k, v, do = _inputs(3, 2, 63, 60, 60, dtype)
    o_ref, grads_ref = _reference(q, k, v, do, "elu")
    with kernels("reference"):
        o, grads = _op_grads(q, k, v, do, "elu")
    assert calls == []
    _check(o, grads, o_ref, grads_ref, dtype)


def test_op_passes_eps_to_the_kernels(monkeypatch):
    """A non-default eps through the public op on the Triton path. Small keys keep the
    normaliser phi(q) . z near eps, so an eps dropped anywhere changes o and every gradient."""
    calls = _record(monkeypatch)
    q, k, v, do = _inputs(1, 2, 37, 12, 20, torch.float32)
    k = k * 0.1
    o_ref, grads_ref = _reference(q, k, v, do, "relu", eps=0.5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with kernels("triton"):
        o = linear_attention(*leaves, feature_map="relu", eps=0.5)
        grads = torch.autograd.grad(o, leaves, do)
    assert calls == LAUNCHERS
    _check(o, grads, o_ref, grads_ref, torch.float32)


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_opcheck(mode, monkeypatch):
    """Schema, fakes and autograd registration on the path named (in Triton mode the
    interpreter runs the kernels inside every check), plus AOT dispatch on the reference."""
    calls = _record(monkeypatch)
    utils = OPCHECK_UTILS[mode]
    q, k, v, do = _inputs(1, 1, 63, 16, 16, torch.float32)
    with kernels(mode):
        torch.library.opcheck(linear_attn_op, (q.requires_grad_(), k.requires_grad_(),
                                               v.requires_grad_(), "elu", 1e-6), test_utils=utils)
        torch.library.opcheck(linear_attn_bwd_op, (do, q.detach(), k.detach(), v.detach(), "elu", 1e-6),
                              test_utils=utils)
    assert set(calls) == (set(LAUNCHERS) if mode == "triton" else set())


def test_compiles_without_graph_breaks(monkeypatch):
    """One fullgraph trace, run on the Triton path and checked against the fp32 reference."""
    calls = _record(monkeypatch)
    q, k, v, do = _inputs(1, 2, 63, 16, 16, torch.float32)
    fn = torch.compile(lambda q, k, v: linear_attention(q, k, v, "relu", 1e-6) * 2.0,
                       backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch._dynamo.reset()
    with kernels("triton"):
        o = fn(*leaves)
        grads = torch.autograd.grad(o, leaves, do)
    assert calls == LAUNCHERS
    o_ref, grads_ref = _reference(q, k, v, 2.0 * do, "relu")
    _check(o, grads, 2.0 * o_ref, grads_ref, torch.float32)


@pytest.mark.parametrize("change,match", [
    pytest.param(dict(q=torch.randn(2, 63, 16)), "q must be 4-D", id="q-3d"),
    pytest.param(dict(v=torch.randn(1, 2, 62, 16)), "v shape", id="v-length"),
    pytest.param(dict(k=torch.randn(1, 2, 63, 8)), "k shape", id="k-dim"),
    pytest.param(dict(k=torch.randn(1, 2, 63, 16, dtype=torch.float64)), "k has dtype", id="k-fp64"),
    pytest.param(dict(v=torch.randn(1, 2, 63, 16).half()), "dtypes differ", id="mixed-dtype"),
    pytest.param(dict(q=torch.randn(1, 2, 63, 300), k=torch.randn(1, 2, 63, 300)), "head dim 300",
                 id="dk-too-big"),
    pytest.param(dict(feature_map="softmax"), "feature_map must be one of", id="feature-map"),
    pytest.param(dict(eps=-1.0), "eps must be", id="eps-negative"),
    pytest.param(dict(eps=float("nan")), "eps must be", id="eps-nan"),
])
def test_invalid_inputs_raise(change, match):
    args = dict(q=torch.randn(1, 2, 63, 16), k=torch.randn(1, 2, 63, 16), v=torch.randn(1, 2, 63, 16),
                feature_map="elu", eps=1e-6)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        linear_attention(**args)


def test_autotune_runs_one_config_in_the_interpreter_and_prunes_per_dtype(monkeypatch):
    # Under the interpreter every tuned kernel has exactly one config (nothing is benchmarked).
    for tuned in (noncausal._state_tuned, noncausal._fwd_out_tuned, noncausal._bwd_q_tuned,
                  noncausal._bwd_kv_tuned):
        assert len(tuned.configs) == 1
    # On a GPU: the dtype's own list, minus configs barred at this BLOCK_K or too big to fit.
    monkeypatch.setattr(noncausal, "interpreting", lambda: False)
    tuned = noncausal._tuned(noncausal._bwd_kv_kernel, noncausal._CONFIGS["bwd_kv"], ["DK"])

    def keep(dtype, block_k):
        kept = noncausal._fits(tuned.configs, {"K": torch.empty(0, dtype=dtype)}, BLOCK_K=block_k)
        return sorted((c.kwargs["BLOCK_L"], c.kwargs["BLOCK_V"], c.num_warps) for c in kept)

    assert keep(torch.bfloat16, 128) == sorted(c[:3] for c in noncausal._CONFIGS["bwd_kv"][2])
    # fp32 at head dim 72 (BLOCK_K 128): the 32-row configs spilled; only 16 rows remain
    assert keep(torch.float32, 128) == [(16, 32, 4)]
    assert keep(torch.float32, 64) == [(16, 32, 4), (16, 64, 4), (32, 64, 8)]
