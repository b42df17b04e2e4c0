"""The mamba2 operator: its math on the Triton path against a plain-torch Mamba-2 written out
here (token-by-token recurrence), outputs and gradients of the input and every parameter; the
Triton path against the reference; the backends (reference, mamba_ssm absent); causality;
precision; options; FLOPs by hand."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from graftfx.kernels._dispatch import optional_backend
from graftfx.registry import get_operator

from ._support import assert_triton_matches_reference, build, region, triton_path

WIDTH, TOKENS = 16, 19                    # 19 tokens: two chunks of 16, the second padded
SMALL = dict(d_state=4, headdim=8, chunk_size=16)


def _mamba(width=WIDTH, tokens=TOKENS, out_width=None, **options):
    torch.manual_seed(1)
    op = build("mamba2", region(width, tokens, 4, out_width=out_width), **options)
    with torch.no_grad():                 # a non-trivial gate weight and skip, so every term shows
        op.norm.weight.uniform_(0.5, 1.5)
        op.D.uniform_(-1, 1)
    return op


def plain_mamba2(op, u):
    """Mamba-2 from its definition, in fp64: projections, causal conv as explicit shifted sums,
    the recurrence h_t = exp(dt A) h_{t-1} + dt B x^T token by token, gated RMSNorm."""
    c = op.config
    batch, L, _ = u.shape
    H, P, G, N = op.nheads, c.headdim, c.ngroups, c.d_state
    zxbcdt = u.double() @ op.in_proj.weight.double().T
    d_in = op.d_inner
    z, xbc, dt = zxbcdt[..., :d_in], zxbcdt[..., d_in:d_in + op.conv_dim], zxbcdt[..., -H:]
    w, b = op.conv1d.weight.double()[:, 0], op.conv1d.bias.double()           # (conv_dim, K)
    K = w.shape[1]
    conv = b.expand(batch, L, -1)
    for k in range(K):              # tap k multiplies the input k steps back (zeros before t=0)
        conv = conv + F.pad(xbc, (0, 0, k, 0))[:, :L] * w[:, K - 1 - k]
    xbc = F.silu(conv)
    x = xbc[..., :d_in].reshape(batch, L, H, P)
    Bm = xbc[..., d_in:d_in + G * N].reshape(batch, L, G, N)
    Cm = xbc[..., d_in + G * N:].reshape(batch, L, G, N)
    dt = F.softplus(dt + op.dt_bias.double())
    A = -torch.exp(op.A_log.double())
    heads = []
    for h in range(H):
        g = h // (H // G)
        state = u.new_zeros(batch, N, P, dtype=torch.float64)
        ys = []
        for t in range(L):
            state = torch.exp(dt[:, t, h] * A[h])[:, None, None] * state \
                + dt[:, t, h, None, None] * Bm[:, t, g, :, None] * x[:, t, h, None, :]
            ys.append(torch.einsum("bn,bnp->bp", Cm[:, t, g], state) + op.D[h].double() * x[:, t, h])
        heads.append(torch.stack(ys, 1))
    y = torch.stack(heads, 2).reshape(batch, L, d_in) * F.silu(z)
    y = y.reshape(batch, L, G, d_in // G)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)
    y = y.reshape(batch, L, d_in) * op.norm.weight.double()
    return y @ op.out_proj.weight.double().T


def test_registered():
    spec = get_operator("mamba2")
    assert spec.kinds == ("self_attention",) and spec.loss == "l1"
    assert spec.option_names() == ["d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size",
                                   "dt_min", "dt_max", "backend"]


def test_paper_config_defaults():
    op = build("mamba2", region(64, 16, 4))
    c = op.config
    assert (c.d_state, c.d_conv, c.expand, c.headdim, c.ngroups, c.backend) == (64, 4, 2, 16, 1, "triton")
    assert op.nheads == 2 * 64 // 16 and op.d_inner == 128
    assert op.in_proj.weight.shape == (2 * 128 + 2 * 64 + op.nheads, 64)
    assert op.conv1d.weight.shape == (128 + 2 * 64, 1, 4)
    dt0 = F.softplus(op.dt_bias)
    assert dt0.min() >= 1e-3 * 0.999 and dt0.max() <= 1e-1 * 1.001
    A = -torch.exp(op.A_log)
    assert (A <= -1 + 1e-6).all() and (A >= -16 - 1e-5).all()
    assert torch.equal(op.D, torch.ones(op.nheads))


@pytest.mark.parametrize("options", [
    pytest.param(SMALL, id="N4-P8"),
    pytest.param(dict(d_state=8, ngroups=2, headdim=4, expand=1, d_conv=3, chunk_size=16), id="G2-N8-P4-K3"),
])
def test_triton_path_is_mamba2(options):
    op = _mamba(**options)
    names, params = zip(*op.named_parameters())
    u = torch.randn(2, TOKENS, WIDTH, requires_grad=True)
    with triton_path():
        y = op(u)
        cot = torch.randn_like(y)
        got = torch.autograd.grad(y, [u, *params], cot)
    want_y = plain_mamba2(op, u)
    want = torch.autograd.grad(want_y, [u, *params], cot.double())
    torch.testing.assert_close(y.double(), want_y, rtol=1e-4, atol=1e-5)
    for name, g, w in zip(("u", *names), got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def test_the_reference_is_mamba2_at_the_paper_config():
    op = _mamba(width=32, tokens=TOKENS)                 # d_state 64, headdim 16, chunk 64
    u = torch.randn(2, TOKENS, 32)
    with torch.no_grad():
        torch.testing.assert_close(op.reference()(u).double(), plain_mamba2(op, u), rtol=1e-4, atol=1e-5)


def test_triton_path_matches_reference():
    op = _mamba(tokens=33, **SMALL)                     # three chunks, the last of one token
    launched = assert_triton_matches_reference(op, torch.randn(2, 33, WIDTH))
    assert {"_ssd_state_fwd_kernel", "_ssd_out_fwd_kernel", "_ssd_chunk_bwd_kernel"} <= set(launched)


def test_backend_reference_never_launches_triton():
    op = _mamba(backend="reference", **SMALL)
    u = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad(), triton_path(expect_launch=False):
        y = op(u)
    torch.testing.assert_close(y.double(), plain_mamba2(op, u), rtol=1e-4, atol=1e-5)


def test_mamba_ssm_backend_never_breaks():
    """Asked for but absent (or on a CPU): the graftfx Triton kernels run, with Mamba-2's numbers."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only fallback check")
    absent = not optional_backend("mamba_ssm")
    with pytest.warns(UserWarning, match="mamba_ssm") if absent else contextlib.nullcontext():
        op = _mamba(backend="mamba_ssm", **SMALL)
    u = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad(), triton_path() as launched:
        y = op(u)
    assert "_ssd_out_fwd_kernel" in launched
    torch.testing.assert_close(y.double(), plain_mamba2(op, u), rtol=1e-4, atol=1e-5)


def test_causal_in_raster_order():
    op, t0 = _mamba(**SMALL), 11
    u = torch.randn(1, TOKENS, WIDTH)
    v = u.clone()
    v[:, t0:] += torch.randn(1, TOKENS - t0, WIDTH)
    with torch.no_grad(), triton_path():
        a, b = op(u), op(v)
    torch.testing.assert_close(a[:, :t0], b[:, :t0], rtol=0, atol=0)
    assert (a[:, t0:] - b[:, t0:]).abs().amax(dim=(0, 2)).min() > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_on_the_triton_path(dtype):
    op = _mamba(**SMALL)
    u = torch.randn(1, TOKENS, WIDTH)
    want = plain_mamba2(op, u)
    low = op.to(dtype)
    with triton_path():
        out = low(u.to(dtype))
        out.float().square().sum().backward()
    assert out.dtype == dtype and out.shape == (1, TOKENS, WIDTH)
    err = (out.double() - want).norm() / want.norm()
    assert err < 3e-2, err
    for name, p in low.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_half_input_fp32_weights():
    op = _mamba(**SMALL)
    u = torch.randn(1, TOKENS, WIDTH)
    with torch.no_grad(), triton_path():
        out, full = op(u.bfloat16()), op(u)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), full, rtol=2e-2, atol=2e-2)


def test_out_width_and_state_dict_names():
    op = _mamba(out_width=24, **SMALL)
    u = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad():
        y = op.reference()(u)
    assert y.shape == (2, TOKENS, 24)
    torch.testing.assert_close(y.double(), plain_mamba2(op, u), rtol=1e-4, atol=1e-5)
    # mamba_ssm's Mamba2 names, so checkpoints move between the two
    assert set(op.state_dict()) == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias",
                                    "A_log", "D", "norm.weight", "out_proj.weight"}


def test_compiles_without_graph_breaks():
    op = _mamba(**SMALL)
    u = torch.randn(2, TOKENS, WIDTH, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(op, backend="aot_eager", fullgraph=True)(u)
    torch.testing.assert_close(out, op(u))
    (g,) = torch.autograd.grad(out.sum(), u)
    (want,) = torch.autograd.grad(op(u).sum(), u)
    torch.testing.assert_close(g, want)


def test_flops_by_hand_on_a_tiny_shape():
    op = build("mamba2", region(4, 3, 2), d_state=2, d_conv=2, expand=1, headdim=2, chunk_size=16)
    # width 4, expand 1: d_inner 4, 2 heads of P 2, one group of N 2, L = 3 (one chunk of Q = 3)
    # in_proj 4 -> z 4 + xBC (4 + 2*2) + dt 2 = 14: 2*3*4*14 = 336; out_proj 2*3*4*4 = 96
    # conv over xBC's 8 channels, 2 taps: 2*3*8*2 = 96
    # scan: C B^T over the 3 x 3 token pairs of the chunk, N 2: 2*9*2 = 36;
    #       (C B^T) x over the pairs, all 4 channels: 2*9*4 = 72;
    #       chunk state B^T x, per token N x d_inner: 2*3*2*4 = 48; read-out C^T h the same: 48
    assert op.flops(3) == 336 + 96 + 96 + 36 + 72 + 48 + 48 == 732


@pytest.mark.parametrize("options,needle", [
    pytest.param(dict(d_state=0), "d_state", id="d_state"),
    pytest.param(dict(d_state=512), "d_state", id="d_state-too-big"),
    pytest.param(dict(d_conv=0), "d_conv", id="d_conv"),
    pytest.param(dict(expand=1.5), "expand", id="expand"),
    pytest.param(dict(headdim=-4), "headdim", id="headdim"),
    pytest.param(dict(chunk_size=48), "chunk_size", id="chunk_size"),
    pytest.param(dict(dt_min=0.5, dt_max=0.1), "dt_min", id="dt-range"),
    pytest.param(dict(backend="cuda"), "backend", id="backend"),
])
def test_invalid_options_raise(options, needle):
    with pytest.raises(ValueError, match=needle):
        get_operator("mamba2").config(**options)


@pytest.mark.parametrize("options,needle", [
    pytest.param(dict(headdim=24), "headdim=24 must divide expand \\* width = 64", id="headdim-not-divisor"),
    pytest.param(dict(ngroups=3), "ngroups=3 must divide the number of heads 4", id="ngroups-not-divisor"),
])
def test_options_that_do_not_fit_the_region(options, needle):
    with pytest.raises(ValueError, match=needle):
        build("mamba2", region(32, TOKENS, 4), **options)
