"""The ``linear_attention`` operator: its math on the Triton path against the explicit L x L
form (outputs and gradients), the Triton path against the reference, precision, options, and
FLOPs counted by torch's FLOP counter on the reference path (which multiplies exactly what the
count claims) and by hand. (Copy-init: test_attention_base.py.)"""
import pytest
import torch
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.registry import get_operator

from ._support import assert_triton_matches_reference, build, flop_count, region, triton_path

WIDTH, HEADS, TOKENS = 16, 2, 9


def _la(heads=HEADS, **options):
    torch.manual_seed(1)
    return build("linear_attention", region(WIDTH, TOKENS, heads), **{"init": "fresh", **options})


def quadratic_form(op, x):
    """Independent form in fp64: the L x L matrix A = phi(q) phi(k)^T, o = A v / (rowsum(A) + eps)."""
    B, L, D = x.shape
    H, Dh = op.heads, op.head_dim
    qkv = F.linear(x.double(), op.qkv.weight.double(), op.qkv.bias.double())
    q, k, v = (t.reshape(B, L, H, Dh).transpose(1, 2) for t in qkv.split(D, dim=-1))
    phi = (lambda t: F.elu(t) + 1) if op.config.feature_map == "elu" else F.relu
    a = phi(q) @ phi(k).transpose(-1, -2)                         # (B, H, L, L)
    o = (a @ v) / (a.sum(-1, keepdim=True) + op.config.eps)
    return F.linear(o.transpose(1, 2).reshape(B, L, D), op.proj.weight.double(), op.proj.bias.double())


@pytest.mark.parametrize("options", [dict(feature_map="elu", eps=1e-4), dict(feature_map="relu", eps=0.5),
                                     dict(feature_map="elu", heads=4)], ids=["elu", "relu-eps", "elu-H4"])
def test_triton_path_is_the_quadratic_form(options):
    op = _la(**options)
    x = torch.randn(2, TOKENS, WIDTH, requires_grad=True)
    with triton_path():
        y = op(x)
        cot = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, op.qkv.weight, op.proj.weight], cot)
    want_y = quadratic_form(op, x)
    want = torch.autograd.grad(want_y, [x, op.qkv.weight, op.proj.weight], cot.double())
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("dx", "dqkv", "dproj"), got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_triton_path_matches_reference(feature_map):
    op = _la(feature_map=feature_map, eps=1e-3)
    assert_triton_matches_reference(op, torch.randn(3, TOKENS, WIDTH))


def test_eps_is_used():
    x = torch.randn(1, TOKENS, WIDTH)
    small, big = _la(eps=1e-6), _la(eps=10.0)
    with torch.no_grad(), triton_path():
        a, b = small(x), big(x)
    torch.testing.assert_close(b.double(), quadratic_form(big, x), rtol=1e-5, atol=1e-5)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_the_triton_path(dtype):
    op = _la().to(dtype)
    x = torch.randn(3, TOKENS, WIDTH).to(dtype)
    with torch.no_grad(), triton_path():
        y = op(x)
    assert y.dtype == dtype
    ref = quadratic_form(op, x)
    err = (y.double() - ref).norm() / ref.norm()
    assert err < {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype], err


def test_flops_by_hand_on_a_tiny_shape():
    op = build("linear_attention", region(4, 3, 2), init="fresh")
    # width 4, 2 heads of Dh 2, L = 3: qkv 2*3*4*12 = 288, proj 2*3*4*4 = 96;
    # per head the state phi(K)^T V is 2*3*2*2 = 24, phi(Q) S another 24, the normaliser
    # phi(Q) . sum phi(K) 2*3*2 = 12: 60 per head, 120 for both
    assert op.flops(3) == 288 + 96 + 120 == 504


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_flops_equal_the_flop_counter_on_the_reference(heads):
    op = _la(heads=heads)
    assert op.flops(TOKENS) == flop_count(op.reference(), torch.randn(1, TOKENS, WIDTH))


@pytest.mark.parametrize("options,match", [
    pytest.param(dict(feature_map="softmax"), "feature_map", id="feature_map"),
    pytest.param(dict(eps=0.0), "eps", id="eps-zero"),
    pytest.param(dict(eps=float("inf")), "eps", id="eps-inf"),
    pytest.param(dict(heads=0), "heads", id="heads-zero"),
    pytest.param(dict(init="zeros"), "init", id="init"),
])
def test_invalid_options_raise(options, match):
    with pytest.raises(GraftError, match=f"operator 'linear_attention': {match}"):
        get_operator("linear_attention").make_config(options)


def test_head_dim_limit_is_the_kernel_limit():
    from graftfx.kernels.linear_attn.noncausal import MAX_HEAD_DIM
    with pytest.raises(ValueError, match=f"head dim {2 * MAX_HEAD_DIM} > {MAX_HEAD_DIM}"):
        build("linear_attention", region(2 * MAX_HEAD_DIM, 4, 1), init="fresh")


def test_registered():
    spec = get_operator("linear_attention")
    assert spec.kinds == ("self_attention",) and spec.loss == "l1"
    assert spec.option_names() == ["heads", "init", "feature_map", "eps"]
    with pytest.raises(GraftError, match="unknown option 'window'"):
        spec.make_config({"window": 4})
