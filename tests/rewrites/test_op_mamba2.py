"""The mamba2 operator: construction from a Region, shapes, gradients, options, and its math
against a plain-torch Mamba-2 written out here (token-by-token scan)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from graftfx.kernels._dispatch import kernels, optional_backend
from graftfx.kernels.testing import assert_rel_close
from graftfx.match.region import Region
from graftfx.registry import get_operator


def region(width=32, tokens=20, out_width=None, grid=None, heads=4):
    return Region(path="blocks.1.attn", kind="self_attention", pattern="self_attention",
                  input=None, output=None, nodes=(), width=width, out_width=out_width or width,
                  tokens=tokens, grid=grid, heads=heads)


def build(width=32, tokens=20, **options):
    return get_operator("mamba2").cls.from_region(region(width, tokens), **options)


def plain_mamba2(op, u):
    """Mamba-2 from its definition, in fp32: projections, causal conv as explicit shifted sums,
    the recurrence h_t = exp(dt A) h_{t-1} + dt B x^T token by token, gated RMSNorm."""
    c = op.config
    batch, L, _ = u.shape
    H, P, G, N = op.nheads, c.headdim, c.ngroups, c.d_state
    u = u.float()
    zxbcdt = u @ op.in_proj.weight.float().T
    d_in = op.d_inner
    z, xbc, dt = zxbcdt[..., :d_in], zxbcdt[..., d_in:d_in + op.conv_dim], zxbcdt[..., -H:]
    w, b = op.conv1d.weight.float()[:, 0], op.conv1d.bias.float()           # (conv_dim, K)
    K = w.shape[1]
    conv = b.expand(batch, L, -1).clone()
    for k in range(K):              # tap k multiplies the input k steps back (zeros before t=0)
        shifted = F.pad(xbc, (0, 0, k, 0))[:, :L]
        conv = conv + shifted * w[:, K - 1 - k]
    xbc = F.silu(conv)
    x = xbc[..., :d_in].reshape(batch, L, H, P)
    Bm = xbc[..., d_in:d_in + G * N].reshape(batch, L, G, N)
    Cm = xbc[..., d_in + G * N:].reshape(batch, L, G, N)
    dt = F.softplus(dt + op.dt_bias.float())
    A = -torch.exp(op.A_log.float())
    y = torch.zeros(batch, L, H, P)
    for h in range(H):
        g = h // (H // G)
        state = torch.zeros(batch, N, P)
        for t in range(L):
            state = torch.exp(dt[:, t, h] * A[h])[:, None, None] * state \
                + dt[:, t, h, None, None] * Bm[:, t, g, :, None] * x[:, t, h, None, :]
            y[:, t, h] = torch.einsum("bn,bnp->bp", Cm[:, t, g], state) \
                + op.D[h].float() * x[:, t, h]
    y = y.reshape(batch, L, d_in) * F.silu(z)
    y = y.reshape(batch, L, G, d_in // G)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)
    y = y.reshape(batch, L, d_in) * op.norm.weight.float()
    return y @ op.out_proj.weight.float().T


def test_registered():
    spec = get_operator("mamba2")
    assert spec.kinds == ("self_attention",) and spec.loss == "l1"
    assert {"d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "backend"} \
        <= set(spec.option_names())


def test_paper_config_defaults():
    op = build(width=64, tokens=16)
    c = op.config
    assert (c.d_state, c.d_conv, c.expand, c.headdim, c.ngroups) == (64, 4, 2, 16, 1)
    assert op.nheads == 2 * 64 // 16 and op.d_inner == 128
    assert op.in_proj.weight.shape == (2 * 128 + 2 * 64 + op.nheads, 64)
    assert op.conv1d.weight.shape == (128 + 2 * 64, 1, 4)
    dt0 = F.softplus(op.dt_bias)
    assert dt0.min() >= 1e-3 * 0.999 and dt0.max() <= 1e-1 * 1.001
    A = -torch.exp(op.A_log)
    assert (A <= -1 + 1e-6).all() and (A >= -16 - 1e-5).all()
    assert torch.equal(op.D, torch.ones(op.nheads))
    assert op.flops(16) > 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("batch", [1, 3], ids=["B1", "B3"])
def test_forward_backward(batch, backend):
    op = build(width=32, tokens=20, d_state=16, headdim=16, backend=backend, chunk_size=16)
    u = torch.randn(batch, 20, 32, requires_grad=True)
    out = op(u)
    assert out.shape == (batch, 20, 32) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
    for name, p in op.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


@pytest.mark.parametrize("options", [
    pytest.param(dict(), id="paper-config"),
    pytest.param(dict(d_state=8, ngroups=2, headdim=8, expand=1, d_conv=3, chunk_size=16),
                 id="G2-N8-P8-K3"),
])
def test_matches_plain_mamba2(options):
    torch.manual_seed(1)
    op = build(width=32, tokens=19, **options)
    with torch.no_grad():   # non-trivial gate and skip so every term shows
        op.norm.weight.uniform_(0.5, 1.5)
        op.D.uniform_(-1, 1)
    u = torch.randn(2, 19, 32)
    assert_rel_close("out", op(u), plain_mamba2(op, u), 1e-5)


def test_triton_path_matches_reference_backend():
    """The Triton kernels (interpreter) inside the operator, forward and input gradient."""
    torch.manual_seed(2)
    op = build(width=16, tokens=40, d_state=16, headdim=16, chunk_size=16)
    ref = build(width=16, tokens=40, d_state=16, headdim=16, chunk_size=16, backend="reference")
    ref.load_state_dict(op.state_dict())
    u = torch.randn(2, 40, 16, requires_grad=True)
    out_ref = ref(u)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), u)
    with kernels("triton"):
        out = op(u)
        (g,) = torch.autograd.grad(out.sum(), u)
    assert_rel_close("out", out, out_ref, 1e-5)
    assert_rel_close("du", g, g_ref, 1e-5)


def test_causal_in_raster_order():
    op = build(width=32, tokens=24, d_state=16)
    u = torch.randn(1, 24, 32)
    v = u.clone()
    v[:, 15:] += torch.randn(1, 9, 32)
    a, b = op(u), op(v)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(dtype):
    op = build(width=32, tokens=20, d_state=16)
    u = torch.randn(1, 20, 32)
    ref = op(u)
    out = op.to(dtype)(u.to(dtype))
    assert out.dtype == dtype and out.shape == (1, 20, 32)
    assert_rel_close("out", out, ref, 3e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in op.parameters())


def test_half_input_fp32_weights():
    op = build(width=32, tokens=20, d_state=16)
    u = torch.randn(1, 20, 32)
    out = op(u.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_rel_close("out", out, op(u), 2e-2)


def test_out_width_and_state_dict_names():
    op = get_operator("mamba2").cls.from_region(region(width=32, out_width=48), d_state=8)
    assert op(torch.randn(2, 20, 32)).shape == (2, 20, 48)
    # mamba_ssm's Mamba2 names, so checkpoints move between the two
    assert set(op.state_dict()) == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias",
                                    "A_log", "D", "norm.weight", "out_proj.weight"}


def test_mamba_ssm_backend_never_breaks():
    """Asked for but absent (or on CPU): the graftfx path runs and gives the same numbers."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only fallback check")
    absent = not optional_backend("mamba_ssm")
    with pytest.warns(UserWarning, match="mamba_ssm") if absent else contextlib.nullcontext():
        op = build(width=32, tokens=20, d_state=16, backend="mamba_ssm")
    ref = build(width=32, tokens=20, d_state=16, backend="reference")
    ref.load_state_dict(op.state_dict())
    u = torch.randn(2, 20, 32)
    assert_rel_close("out", op(u), ref(u), 1e-5)


def test_compiles_without_graph_breaks():
    op = build(width=32, tokens=20, d_state=16, chunk_size=16)
    u = torch.randn(2, 20, 32, requires_grad=True)
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    out = compiled(u)
    assert_rel_close("out", out, op(u), 1e-6)
    out.sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


@pytest.mark.parametrize("options,needle", [
    pytest.param(dict(d_state=0), "d_state", id="d_state"),
    pytest.param(dict(d_state=512), "d_state", id="d_state-too-big"),
    pytest.param(dict(d_conv=0), "d_conv", id="d_conv"),
    pytest.param(dict(expand=1.5), "expand", id="expand"),
    pytest.param(dict(headdim=-4), "headdim", id="headdim"),
    pytest.param(dict(headdim=24), "headdim", id="headdim-not-divisor"),
    pytest.param(dict(ngroups=3), "ngroups", id="ngroups-not-divisor"),
    pytest.param(dict(chunk_size=48), "chunk_size", id="chunk_size"),
    pytest.param(dict(dt_min=0.5, dt_max=0.1), "dt_min", id="dt-range"),
    pytest.param(dict(backend="cuda"), "backend", id="backend"),
])
def test_invalid_options_raise(options, needle):
    with pytest.raises(ValueError, match=needle):
        build(width=32, tokens=20, **options)
