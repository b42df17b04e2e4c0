"""The kernels at the shapes they run at: one table for the static report, the CUDA tests and the
kernel benchmarks.

A ``KernelCase`` is one kernel family at one real shape, with its inputs laid out as the operator
hands them over (q, k, v as head views into one packed projection; Hyena's in-projection output;
Mamba-2's x/B/C as views into the conv output), and:

- ``launch(inputs)``: the forward and backward launchers, called directly. The static report
  (``graftfx.bench.static``) runs it on ``meta`` tensors under a fake sm_90 driver, so every
  kernel compiles with exactly the arguments, constexprs and alignment a GPU launch would get;
- ``run(inputs)``: the public function (the custom op with autograd), what a model calls;
- ``reference(inputs)``: the fp32 reference of the same function (``naive.py``), differentiable;
- ``flops(pass)`` / ``bytes(pass, elem)``: the useful work and the compulsory traffic of the
  kernel itself (not of an operator around it), for the benchmark's ratios;
- ``ref_batch``/``ref_heads``: how much of the problem the dense reference may see at this shape
  (a slice of independent batch elements / heads): the rest is checked by the kernel alone.

Shapes are the bench shapes: DiT-XL/2 and PixArt-Sigma, width 1152 in 16 heads of 72
(``HEAD_DIMS``: 72, and 64 as 18 heads), batch 8, L = 4096 (PixArt 1024 px) and 16384 (2048 px);
the paper's Mamba-2 (d_state 64, headdim 16, expand 2: 144 heads). Depends on torch only (and the
kernels it names).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

WIDTH = 1152                      # DiT-XL/2 and PixArt-Sigma
HEAD_DIMS = (72, 64)              # 1152 / 16 (the models'), 1152 / 18 (the aligned comparison)
BATCH = 8
LENGTHS = (4096, 16384)           # PixArt-Sigma 1024 px and 2048 px: 64^2 and 128^2 tokens
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd", "fwd+bwd")


@dataclass
class KernelCase:
    family: str                                  # swa, nat2d, linear_attn, mamba2, hyena_x, ...
    label: str                                   # e.g. "swa w=4 L=4096 hd=72"
    dims: dict                                   # the shape's facts (B, H, L, D, window, ...)
    make: Callable                               # (device, dtype, seed) -> dict of named inputs
    launch: Callable                             # (inputs) -> None: fwd + bwd launchers
    run: Callable                                # (inputs) -> output tensor (differentiable)
    reference: Callable                          # (inputs) -> fp32 output (differentiable)
    grads: tuple[str, ...]                       # inputs that get gradients
    flops: Callable                              # (pass) -> useful FLOPs
    bytes: Callable                              # (pass, elem) -> compulsory bytes
    ref_slice: Callable | None = None            # (tensor name, tensor) -> the part the reference sees
    ref_inputs: Callable | None = None           # (inputs) -> the inputs the reference sees
    streams: tuple[str, ...] = ()                # the main operand streams (static report check)
    extra: dict = field(default_factory=dict)

    @property
    def heads_dim(self) -> int | None:
        return self.dims.get("D")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, device, dtype, g, scale=1.0):
    if torch.device(device).type == "meta":
        return torch.empty(shape, device=device, dtype=dtype)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- attention family
def _packed_qkv(B, H, L, D, device, dtype, g):
    """q, k, v (B, H, L, D) as the attention operators make them: head views of one (B, L, 3HD)
    projection (row stride 3HD, head stride D)."""
    qkv = _randn((B, L, 3 * H * D), device, dtype, g)
    return [t.view(B, L, H, D).transpose(1, 2) for t in qkv.chunk(3, dim=-1)]


def _attn_bytes(B, H, L, D):
    def count(pass_, elem):
        t = B * H * L * D * elem            # one (B, H, L, D) tensor
        lse = B * H * L * 4
        if pass_ == "fwd":
            return 3 * t + t + lse          # read q, k, v; write o (+ the fp32 logsumexp)
        # + backward: read q, k, v, o, do, lse; write dq, dk, dv
        return 3 * t + t + lse + 5 * t + lse + 3 * t
    return count


def _head_slice(name, t):
    """The dense references see batch element 0 and two heads (one L x L score matrix each)."""
    return t[:1, :2]


def swa_case(L: int, D: int, window: int = 4, B: int = BATCH, width: int = WIDTH) -> KernelCase:
    from .swa import fused, naive

    H = width // D
    scale = D ** -0.5

    def make(device, dtype, seed=0):
        q, k, v = _packed_qkv(B, H, L, D, device, dtype, _gen(seed))
        return {"q": q, "k": k, "v": v}

    def launch(x):
        o, lse = fused.swa_fwd(x["q"], x["k"], x["v"], window, scale)
        fused.swa_bwd(torch.empty_like(o), x["q"], x["k"], x["v"], o, lse, window, scale)

    def run(x):
        return fused.sliding_window_attention(x["q"], x["k"], x["v"], window, scale=scale)

    def reference(x):
        return naive.naive_swa(x["q"], x["k"], x["v"], window, scale)[0]

    keys = min(L, 2 * window + 1)          # keys per query (fewer at the ends; counted in full)

    def flops(pass_):
        fwd = 4 * B * H * L * keys * D      # QK^T and PV
        return fwd if pass_ == "fwd" else fwd + 2.5 * fwd    # bwd: QK^T, dV, dP, dQ, dK
    return KernelCase("swa", f"swa w={window} L={L} hd={D}",
                      dict(B=B, H=H, L=L, D=D, window=window), make, launch, run, reference,
                      ("q", "k", "v"), flops, _attn_bytes(B, H, L, D), _head_slice,
                      streams=("Q", "K", "V", "DO", "O"))


def nat2d_case(side: int, D: int, kernel_size: int = 7, B: int = BATCH,
               width: int = WIDTH) -> KernelCase:
    from .nat2d import fused, naive

    H, L = width // D, side * side
    scale = D ** -0.5
    grid = (side, side)

    def make(device, dtype, seed=0):
        q, k, v = _packed_qkv(B, H, L, D, device, dtype, _gen(seed))
        return {"q": q, "k": k, "v": v}

    def launch(x):
        o, lse = fused.nat2d_fwd(x["q"], x["k"], x["v"], grid, kernel_size, scale)
        fused.nat2d_bwd(torch.empty_like(o), x["q"], x["k"], x["v"], o, lse, grid, kernel_size, scale)

    def run(x):
        return fused.neighborhood_attention_2d(x["q"], x["k"], x["v"], grid, kernel_size, scale=scale)

    def reference(x):
        return naive.naive_nat2d(x["q"], x["k"], x["v"], grid, kernel_size, scale)[0]

    keys = min(kernel_size, side) ** 2

    def flops(pass_):
        fwd = 4 * B * H * L * keys * D
        return fwd if pass_ == "fwd" else 3.5 * fwd
    return KernelCase("nat2d", f"nat2d k={kernel_size} L={L} hd={D}",
                      dict(B=B, H=H, L=L, D=D, kernel_size=kernel_size, grid=grid), make, launch,
                      run, reference, ("q", "k", "v"), flops, _attn_bytes(B, H, L, D), _head_slice,
                      streams=("Q", "K", "V", "DO", "O"))


def linear_attn_case(L: int, D: int, B: int = BATCH, width: int = WIDTH,
                     feature_map: str = "elu") -> KernelCase:
    from .linear_attn import naive, noncausal

    H = width // D

    def make(device, dtype, seed=0):
        q, k, v = _packed_qkv(B, H, L, D, device, dtype, _gen(seed))
        return {"q": q, "k": k, "v": v}

    def launch(x):
        noncausal.linear_attn_fwd(x["q"], x["k"], x["v"], feature_map)
        noncausal.linear_attn_bwd(torch.empty_like(x["q"]), x["q"], x["k"], x["v"], feature_map)

    def run(x):
        return noncausal.linear_attention(x["q"], x["k"], x["v"], feature_map)

    def reference(x):
        return naive.linear_attn_ref(x["q"].float(), x["k"].float(), x["v"].float(), feature_map)

    def flops(pass_):
        fwd = 2 * 2 * B * H * L * D * D      # the (D, D) state and its read-out
        return fwd if pass_ == "fwd" else fwd + 2 * fwd + fwd   # bwd: 2 states + dq + dk/dv

    def count(pass_, elem):
        t = B * H * L * D * elem
        return 4 * t if pass_ == "fwd" else 4 * t + 4 * t + 3 * t   # bwd: q, k, v, do; dq, dk, dv
    return KernelCase("linear_attn", f"linear_attn {feature_map} L={L} hd={D}",
                      dict(B=B, H=H, L=L, D=D), make, launch, run, reference, ("q", "k", "v"),
                      flops, count, None, streams=("X", "Y", "Q", "K", "V", "DO"))


# ----------------------------------------------------------------------------- Mamba-2 SSD
def mamba2_case(L: int, B: int = BATCH, width: int = WIDTH, d_state: int = 64, headdim: int = 16,
                expand: int = 2, ngroups: int = 1, chunk: int = 64) -> KernelCase:
    from .mamba2 import naive, ssd

    d_inner = expand * width
    H, N, P, G = d_inner // headdim, d_state, headdim, ngroups
    conv_dim = d_inner + 2 * G * N

    def make(device, dtype, seed=0):
        g = _gen(seed)
        # x, B, C: views into the (B, L, conv_dim) conv output, as the operator splits it
        xbc = _randn((B, L, conv_dim), device, dtype, g)
        x, Bm, Cm = xbc.split([d_inner, G * N, G * N], dim=-1)
        meta = torch.device(device).type == "meta"
        dt = (torch.empty((B, L, H), device=device) if meta else
              F.softplus(torch.randn((B, L, H), generator=g) - 2.0).to(device))
        A = (torch.empty(H, device=device) if meta else
             -torch.exp(torch.empty(H).uniform_(-4.0, 0.7, generator=g)).to(device))
        Dp = torch.empty(H, device=device) if meta else torch.randn(H, generator=g).to(device)
        return {"x": x.reshape(B, L, H, P), "dt": dt, "A": A, "B": Bm.reshape(B, L, G, N),
                "C": Cm.reshape(B, L, G, N), "D": Dp}

    def args(x):
        return x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"]

    def launch(x):
        ssd.ssd_fwd(*args(x), chunk_size=chunk)
        ssd.ssd_bwd(torch.empty(x["x"].shape, device=x["x"].device, dtype=x["x"].dtype),
                    *args(x), chunk_size=chunk)

    def run(x):
        return ssd.ssd_scan(*args(x), chunk_size=chunk)

    def reference(x):
        return naive.ssd_chunked(*args(x), chunk_size=chunk)

    def flops(pass_):
        Q = min(chunk, L)
        fwd = 2 * B * L * (Q * N * G + Q * d_inner + 2 * N * d_inner)
        return fwd if pass_ == "fwd" else 3.5 * fwd

    def count(pass_, elem):
        xs, bc, dt = B * L * d_inner * elem, 2 * B * L * G * N * elem, B * L * H * 4
        fwd = xs + bc + dt + xs                       # x, B, C, dt in; y out
        return fwd if pass_ == "fwd" else fwd + xs + (xs + bc + dt) + (xs + bc + dt)
    return KernelCase("mamba2", f"mamba2 ssd N={N} P={P} H={H} L={L}",
                      dict(B=B, H=H, L=L, N=N, P=P, G=G, chunk=chunk), make, launch, run,
                      reference, ("x", "dt", "A", "B", "C", "D"), flops, count,
                      ref_inputs=lambda x: {k: (v[:1] if v.dim() > 1 else v) for k, v in x.items()},
                      streams=("x_ptr", "B_ptr", "C_ptr", "dy_ptr"))


# ----------------------------------------------------------------------------- Hyena
def _hyena_case(family: str, L: int, B: int = BATCH, width: int = WIDTH, taps: int = 4) -> KernelCase:
    from .hyena import featurize, hyena_x, hyena_y, naive

    d = width
    channels = 3 * d if family in ("hyena_x", "short_conv") else d
    fwd_l, bwd_l, public, ref = {
        "hyena_x": (hyena_x.hyena_x_fwd, hyena_x.hyena_x_bwd, hyena_x.hyena_x_gate, naive.hyena_x),
        "hyena_y": (hyena_y.hyena_y_fwd, hyena_y.hyena_y_bwd, hyena_y.hyena_y_gate, naive.hyena_y),
        "short_conv": (featurize.short_conv_fwd, featurize.short_conv_bwd, featurize.short_conv,
                       naive.causal_conv),
    }[family]

    def make(device, dtype, seed=0):
        g = _gen(seed)
        u = _randn((B, L, 3 * d), device, dtype, g)          # the in-projection output
        # the operator's filters: Conv1d weights (C, 1, K) squeezed to (C, K), fp32 or the model's
        w = _randn((channels, taps), device, dtype, g, taps ** -0.5)
        b = _randn((channels,), device, dtype, g, 0.1)
        return {"u": u, "weight": w, "bias": b}

    def launch(x):
        y = fwd_l(x["u"], x["weight"], x["bias"])
        bwd_l(torch.empty_like(y), x["u"], x["weight"], x["bias"])

    def run(x):
        return public(x["u"], x["weight"], x["bias"])

    def reference(x):
        return ref(x["u"], x["weight"], x["bias"])

    out = 3 * d if family == "short_conv" else d

    def flops(pass_):
        fwd = 2 * B * L * channels * taps
        return fwd if pass_ == "fwd" else 3 * fwd

    def count(pass_, elem):
        u, y = B * L * 3 * d * elem, B * L * out * elem
        return u + y if pass_ == "fwd" else (u + y) + (u + y + u)   # bwd: read u, dy; write du
    return KernelCase(family, f"{family} K={taps} L={L} C={3 * d}", dict(B=B, L=L, C=3 * d, K=taps),
                      make, launch, run, reference, ("u", "weight", "bias"), flops, count,
                      streams=("U", "u_ptr", "u_b", "DY", "dy_b"))


def hyena_x_case(L, **kw):
    return _hyena_case("hyena_x", L, **kw)


def hyena_y_case(L, **kw):
    return _hyena_case("hyena_y", L, **kw)


def short_conv_case(L, **kw):
    return _hyena_case("short_conv", L, **kw)


# ----------------------------------------------------------------------------- the tables
def static_cases(head_dims=HEAD_DIMS, L: int = LENGTHS[0]) -> list[KernelCase]:
    """What the static report compiles: every kernel family, forward and backward, at the bench
    shape (L = 4096) and each head dim (the head-dim-free families once)."""
    cases = []
    for D in head_dims:
        cases += [swa_case(L, D), nat2d_case(int(math.isqrt(L)), D), linear_attn_case(L, D)]
    cases += [mamba2_case(L), short_conv_case(L), hyena_x_case(L), hyena_y_case(L)]
    return cases
