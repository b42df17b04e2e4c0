"""The ``linear_attention`` operator built through ``from_region`` on hand-made regions."""
import pytest
import torch
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.kernels._dispatch import kernels
from graftfx.match.region import Region
from graftfx.registry import get_operator

WIDTH, HEADS, TOKENS = 64, 4, 64


def _region(width=WIDTH, heads=HEADS, tokens=TOKENS, weights=None, bias=True):
    if weights is None:
        weights = {}
        for name in ("q", "k", "v", "out"):
            weights[f"{name}.weight"] = torch.randn(width, width) / width ** 0.5
            if bias:
                weights[f"{name}.bias"] = torch.randn(width) * 0.1
    side = int(tokens ** 0.5)
    return Region(path="blocks.1.attn", kind="self_attention", pattern="self_attention", input=None,
                  output=None, nodes=(), width=width, out_width=width, tokens=tokens,
                  grid=(side, side), heads=heads, head_dim=width // heads if heads else None, weights=weights)


def _build(region=None, **options):
    return get_operator("linear_attention").cls.from_region(region or _region(), **options)


def _quadratic_reference(mod, x):
    """Independent form: explicit L x L kernel matrix A = phi(q) phi(k)^T, o = A v / rowsum(A)."""
    B, L, D = x.shape
    H, Dh = mod.heads, mod.head_dim
    w, b = mod.qkv.weight.double(), mod.qkv.bias.double()
    qkv = x.double() @ w.T + b
    q, k, v = (t.reshape(B, L, H, Dh).transpose(1, 2) for t in qkv.split(D, dim=-1))
    phi = (lambda t: F.elu(t) + 1) if mod.config.feature_map == "elu" else F.relu
    a = phi(q) @ phi(k).transpose(-1, -2)                         # (B, H, L, L)
    o = (a @ v) / (a.sum(-1, keepdim=True) + mod.config.eps)
    o = o.transpose(1, 2).reshape(B, L, D)
    return o @ mod.proj.weight.double().T + mod.proj.bias.double()


def test_registered():
    spec = get_operator("linear_attention")
    assert spec.kinds == ("self_attention",) and spec.loss == "l1"
    assert set(spec.option_names()) == {"heads", "feature_map", "eps", "init"}
    with pytest.raises(GraftError, match="unknown option 'window'"):
        spec.make_config({"window": 4})


@pytest.mark.parametrize("options", [
    pytest.param({}, id="default-elu-copy"),
    pytest.param(dict(feature_map="relu", init="fresh", heads=2), id="relu-fresh-H2"),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_backward(options, batch):
    mod = _build(**options)
    x = torch.randn(batch, TOKENS, WIDTH, requires_grad=True)
    y = mod(x)
    assert y.shape == (batch, TOKENS, WIDTH) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_matches_quadratic_form(feature_map):
    mod = _build(feature_map=feature_map, eps=1e-4)
    x = torch.randn(3, TOKENS, WIDTH)
    ref = _quadratic_reference(mod, x)
    assert torch.allclose(mod(x).double(), ref, rtol=1e-4, atol=1e-5)


def test_triton_path_matches_reference_path():
    mod = _build()
    x = torch.randn(1, TOKENS, WIDTH, requires_grad=True)
    with kernels("triton"):
        y_tri = mod(x)
        g_tri = torch.autograd.grad(y_tri.sum(), (x, mod.qkv.weight))
    with kernels("reference"):
        y_ref = mod(x)
        g_ref = torch.autograd.grad(y_ref.sum(), (x, mod.qkv.weight))
    assert torch.allclose(y_tri, y_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_tri, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_copy_init_takes_original_projections():
    region = _region()
    mod = _build(region)
    w = region.weights
    assert torch.equal(mod.qkv.weight, torch.cat([w["q.weight"], w["k.weight"], w["v.weight"]]))
    assert torch.equal(mod.qkv.bias, torch.cat([w["q.bias"], w["k.bias"], w["v.bias"]]))
    assert torch.equal(mod.proj.weight, w["out.weight"]) and torch.equal(mod.proj.bias, w["out.bias"])
    no_bias = _build(_region(bias=False))
    assert torch.count_nonzero(no_bias.qkv.bias) == 0 and torch.count_nonzero(no_bias.proj.bias) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    mod = _build().to(dtype)
    x = torch.randn(3, TOKENS, WIDTH).to(dtype)
    y = mod(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    ref = _quadratic_reference(mod, x)
    err = (y.double() - ref).norm() / ref.norm()
    assert err < {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype], err


def test_flops():
    mod = _build()
    L, d, dh = TOKENS, WIDTH, WIDTH // HEADS
    assert mod.flops(L) == 2 * L * d * 3 * d + 2 * L * d * d + 4 * L * d * dh + 2 * L * d


@pytest.mark.parametrize("options,region_kw,match", [
    pytest.param(dict(feature_map="softmax"), {}, "feature_map", id="feature_map"),
    pytest.param(dict(eps=0.0), {}, "eps", id="eps-zero"),
    pytest.param(dict(eps=float("inf")), {}, "eps", id="eps-inf"),
    pytest.param(dict(heads=0), {}, "heads", id="heads-zero"),
    pytest.param(dict(heads=5), {}, "heads=5", id="heads-not-divisor"),
    pytest.param(dict(heads=1, init="fresh"), dict(width=512, weights={}), "head dim 512",
                 id="head-dim-too-big"),
    pytest.param(dict(init="zeros"), {}, "init", id="init"),
    pytest.param({}, dict(weights={}), "init='copy'", id="copy-without-weights"),
    pytest.param({}, dict(heads=None), "heads", id="no-heads"),
])
def test_invalid_options_raise(options, region_kw, match):
    with pytest.raises(ValueError, match=match):
        _build(_region(**region_kw), **options)
