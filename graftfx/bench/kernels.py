"""Kernel-level benchmarks (``graftfx bench --kernels``): each kernel core on its own, against
what a user would run instead, with the kernel's own byte and FLOP counts.

The operator bench (``runner``) times whole operators, whose q/k/v/out projections dominate;
here every case is one kernel family of ``graftfx.kernels.cases`` at one shape: its inputs laid
out as the operator hands them over (q, k, v as head views of one packed projection; Hyena's
in-projection output; Mamba-2's x/B/C as views into the conv output), its public function
(``case.run``: the custom op, Triton on CUDA), its fp32 reference (``case.reference``, naive.py)
and its counts (``case.flops`` / ``case.bytes``, see ``COUNTS``). This module names the kernel
families on purpose (a kernel-level table is per kernel); the operator bench names none.

Paths of a case, each only where it runs (otherwise a row says why):

- ``graftfx``: the kernel's public function under ``kernels("triton")`` (CUDA only).
- baselines computing the same function: ``flex_attention`` (compiled, ``create_block_mask``
  with a sliding-window or a 2D-neighbourhood ``mask_mod``), ``sdpa + mask`` (dense
  ``F.scaled_dot_product_attention`` with the additive mask; skipped past a memory budget),
  ``torch matmuls`` (linear attention as two matmuls in the run dtype), ``fla`` (its causal
  linear-attention kernel run forward and reversed; its ``chunk_simple_gla`` as the SSD scan),
  ``mamba_ssm`` (``mamba_chunk_scan_combined``), ``F.conv1d + gate`` and ``causal_conv1d + gate``
  (the unfused Hyena featurizer).
- ``sdpa (full)``: dense attention without a mask, what the replaced attention costs (a
  different function: checked against full attention, credited with full attention's FLOPs).
- ``reference (fp32)``: on a CPU only, the fp32 oracle itself.

Before a path is timed its output (and, for fwd+bwd, every input gradient) is checked against
the fp32 reference by relative error (``TOL``): a path that fails is reported, not timed. The
dense references see a slice (``case.ref_slice`` / ``ref_inputs``: batch 0, two heads); the
path's cotangent is zero outside that slice, so gradients of shared inputs (filters, A, D)
compare too. On a CPU the Triton path cannot be timed meaningfully: the reference and the
torch baselines are timed at reduced shapes and the Triton kernels are checked through the
interpreter (``TRITON_INTERPRET=1``) at a tiny shape (``interpreter_checks``).

Targets (``targets``), as ratios of one run: the Hyena featurizer fwd+bwd at >= 80% of the
measured copy bandwidth and >= 2x the unfused ``F.conv1d + gate``; swa faster than
flex_attention at w = 4..64, L = 4096..16384; every kernel at least as fast as its best
baseline at the PixArt-Sigma 2048 px shape (L = 16384, width 1152 = 16 heads x 72).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.kernels import cases as kc

from .harness import Ceilings, Timing, dtype_name, time_callable

FAMILIES = ("hyena_x", "swa", "nat2d", "linear_attn", "mamba2")
TITLES = {"hyena_x": "Hyena featurizer (fused causal short conv + gate)",
          "swa": "sliding-window attention", "nat2d": "2D neighbourhood attention",
          "linear_attn": "linear attention (non-causal, elu+1)", "mamba2": "Mamba-2 SSD scan"}
# The counts of graftfx.kernels.cases, per family (tests/bench/test_kernel_bench.py checks the
# numbers against these formulas). t = one (B, H, L, D) tensor at the run's element size.
COUNTS = {
    "hyena_x": "FLOPs fwd 2*B*L*C*K (the conv; the gate's products not counted), fwd+bwd 3x; "
               "bytes fwd u + y (read u (B, L, C=3d), write y (B, L, d)), fwd+bwd 3u + 2y "
               "(adds read u, dy, write du); filters negligible. Memory-bound",
    "swa": "FLOPs fwd 4*B*H*L*min(L, 2w+1)*D (QK^T and PV over the window, edges counted in "
           "full), fwd+bwd 3.5x; bytes fwd 4t + lse (read q, k, v, write o, fp32 lse), fwd+bwd "
           "12t + 2 lse (adds read q, k, v, o, do, lse, write dq, dk, dv)",
    "nat2d": "FLOPs fwd 4*B*H*L*min(k, side)^2*D, fwd+bwd 3.5x; bytes as swa",
    "linear_attn": "FLOPs fwd 4*B*H*L*D^2 (the (D, D) state and its read-out), fwd+bwd 4x; "
                   "bytes fwd 4t, fwd+bwd 11t",
    "mamba2": "FLOPs fwd 2*B*L*(Q*N*G + Q*d_inner + 2*N*d_inner) (chunk Q, state N, groups G), "
              "fwd+bwd 3.5x; bytes fwd 2x + bc + dt (read x, B, C, fp32 dt, write y), fwd+bwd "
              "adds read dy, re-read x, B, C, dt, write dx, dB, dC, ddt (5x + 3bc + 3dt in all)",
}
DENSE_COUNT = "sdpa (full) rows: FLOPs 4*B*H*L^2*D fwd, 3.5x fwd+bwd; bytes as the kernel's"
# relative error ||path - ref|| / ||ref|| allowed for the output; gradients get twice as much
TOL = {"fp32": 1e-3, "bf16": 2e-2, "fp16": 5e-3}
PASSES = ("fwd", "fwd+bwd")
KERNEL, BASELINE, DENSE, REFERENCE = "kernel", "baseline", "dense", "reference"
CPU_NOTE = "CPU: no kernel timings; the targets need a GPU"
CUDA_GRAPH_MAX_BYTES = 256 << 20       # --cuda-graphs: cases whose fwd moves at most this much
CPU_MEMORY_BUDGET = 4 << 30            # dense masked SDPA on a CPU: the math path's scores
SWA_WINDOWS, SWA_LENGTHS = (4, 16, 64), (4096, 16384)
FLEX_WINDOW = 4                        # the window of the PixArt-shape swa case


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Group:
    """One set of shapes: a batch, token count and width in heads of ``head_dim``."""

    name: str
    batch: int
    tokens: int
    width: int
    head_dim: int = 72

    def label(self) -> str:
        return f"B{self.batch} L{self.tokens} D{self.width} H{self.width // self.head_dim}"


def _five(g: Group, window: int = FLEX_WINDOW) -> list:
    side = math.isqrt(g.tokens)
    if side * side != g.tokens:
        raise GraftError(f"kernel bench group {g.name}: L={g.tokens} is not a square token grid "
                         f"(nat2d needs one); use a square L")
    return [kc.hyena_x_case(g.tokens, B=g.batch, width=g.width),
            kc.swa_case(g.tokens, g.head_dim, window, B=g.batch, width=g.width),
            kc.nat2d_case(side, g.head_dim, 7, B=g.batch, width=g.width),
            kc.linear_attn_case(g.tokens, g.head_dim, B=g.batch, width=g.width),
            kc.mamba2_case(g.tokens, B=g.batch, width=g.width)]


def _sweep(g: Group, lengths, windows) -> list:
    return [kc.swa_case(n, g.head_dim, w, B=g.batch, width=g.width) for n in lengths for w in windows
            if not (n == g.tokens and w == FLEX_WINDOW)]


def plan(device: torch.device, *, quick: bool = False, batch: int | None = None,
         families: list[str] | None = None) -> tuple[list[tuple[Group, object]], list[str]]:
    """(group, KernelCase) pairs in priority order (a time budget cuts from the end), and notes.

    GPU: the PixArt-Sigma 2048 px shape (B8 L16384, 16 heads x 72) for every kernel, the swa
    sweep (w = 4, 16, 64 at L = 4096, 16384), DiT-XL/2 (L = 256). ``quick``: L = 4096 and swa
    w = 64. CPU: the five kernels scaled down (B1, width 288 = 4 heads x 72, L = 1024) and swa
    at w = 16, 64; quick: the five at width 144, L = 64."""
    cuda = device.type == "cuda"
    for f in families or ():
        if f not in FAMILIES:
            raise GraftError(f"--kernel {f!r} is not a kernel family; choose from {', '.join(FAMILIES)}")
    notes = []
    if cuda:
        b = batch or 8
        if quick:
            main = Group("pixart-1024", b, 4096, 1152)
            groups = [(main, _five(main)), (Group("swa sweep", b, 4096, 1152),
                                            _sweep(main, (4096,), (64,)))]
        else:
            main = Group("pixart-2048", b, 16384, 1152)
            dit = Group("dit-xl2", b, 256, 1152)
            groups = [(main, _five(main)), (Group("swa sweep", b, 16384, 1152),
                                             _sweep(main, SWA_LENGTHS, SWA_WINDOWS)),
                      (dit, _five(dit))]
    else:
        b = batch or 1
        if quick:
            main = Group("pixart-2048/cpu", b, 64, 144)
            groups = [(main, _five(main))]
        else:
            main = Group("pixart-2048/cpu", b, 1024, 288)
            groups = [(main, _five(main)),
                      (Group("swa sweep/cpu", b, 1024, 288), _sweep(main, (1024,), SWA_WINDOWS))]
        notes.append(f"{CPU_NOTE}. Shapes scaled down: {main.label()} fp32 for the PixArt group "
                     f"(the GPU runs B8 L16384 D1152 H16 bf16)")
    out = [(g, c) for g, cs in groups for c in cs if not families or c.family in families]
    return out, notes


# ----------------------------------------------------------------------------- paths
@dataclass
class Path:
    name: str
    role: str                                  # KERNEL | BASELINE | DENSE | REFERENCE
    fn: Callable | None                        # (inputs) -> output like case.run's
    skip: str = ""                             # why it is not run
    no_backward: str = ""                      # why fwd+bwd is not run ("" when it is)
    reference: Callable | None = None          # fp32 reference of what it computes (None: the case's)
    flops: Callable | None = None              # (pass) -> FLOPs credited (None: the case's)
    mode: str | None = None                    # graftfx kernel mode for forward AND backward

    def context(self):
        if self.mode is None:
            return contextlib.nullcontext()
        from graftfx.kernels._dispatch import kernels

        return kernels(self.mode)


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _kernel_path(case, device: torch.device) -> Path:
    from graftfx.kernels._dispatch import HAS_TRITON

    why = ("triton is not installed" if not HAS_TRITON else
           "CPU: no kernel timings" if device.type != "cuda" else "")
    # the mode holds around the backward too: the custom ops pick their path per call
    return Path("graftfx", KERNEL, case.run, why, mode="triton")


def _flex():
    """flex_attention compiled once per process (eager on a CPU: compiling takes ~30 s there)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not hasattr(_flex, "compiled"):
        # one compile per case (shape, mask): past dynamo's recompile limit (8) it would fall
        # back to eager flex_attention, which materialises the scores
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        _flex.compiled = torch.compile(flex_attention, dynamic=False)
    return _flex.compiled


def window_mask_mod(window: int):
    """flex_attention mask_mod of sliding-window attention: |q - kv| <= window."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window
    return mask_mod


def neighbourhood_mask_mod(height: int, width: int, kernel_size: int):
    """flex_attention mask_mod of 2D neighbourhood attention on an (H, W) raster grid, windows
    shifted inward at the borders (graftfx.kernels.nat2d.naive's convention)."""
    half, top, left = kernel_size // 2, max(height - kernel_size, 0), max(width - kernel_size, 0)

    def mask_mod(b, h, q_idx, kv_idx):
        r0 = (q_idx // width - half).clamp(0, top)
        c0 = (q_idx % width - half).clamp(0, left)
        kr, kcol = kv_idx // width, kv_idx % width
        return (kr >= r0) & (kr < r0 + kernel_size) & (kcol >= c0) & (kcol < c0 + kernel_size)
    return mask_mod


def _flex_path(mask_mod, L: int, scale: float, device: torch.device) -> Path:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return Path("flex_attention", BASELINE, None, f"torch.nn.attention.flex_attention: {e}")
    cuda = device.type == "cuda"
    made: dict = {}

    def run(x):
        if "mask" not in made:          # built once per case, outside the timed calls
            made["mask"] = create_block_mask(mask_mod, None, None, L, L, device=str(device))
        if cuda:
            return _flex()(x["q"], x["k"], x["v"], block_mask=made["mask"], scale=scale)
        with warnings.catch_warnings():     # "called without torch.compile": known, on purpose
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(x["q"], x["k"], x["v"], block_mask=made["mask"], scale=scale)
    no_bwd = "" if cuda else f"FlexAttention has no backward on a CPU (torch {torch.__version__})"
    name = "flex_attention" if cuda else "flex_attention (eager)"
    return Path(name, BASELINE, run, no_backward=no_bwd)


def _masked_sdpa_path(mask_fn, B: int, H: int, L: int, dtype: torch.dtype,
                      device: torch.device) -> Path:
    elem = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        # a fused SDPA kernel (memory-efficient / cuDNN) reads the (L, L) additive mask; forcing
        # those backends keeps the math path's B*H*L^2 scores out
        need, budget = 2 * L * L * elem, 0.5 * torch.cuda.mem_get_info(device)[0]
    else:
        need, budget = 3 * B * H * L * L * 4, CPU_MEMORY_BUDGET
    if need > budget:
        return Path("sdpa + mask", BASELINE, None,
                    f"the dense mask needs ~{need / 1e9:.1f} GB, over the {budget / 1e9:.1f} GB budget")
    made: dict = {}

    def run(x):
        if "mask" not in made:
            keep = mask_fn()                                              # (L, L) bool
            made["mask"] = torch.zeros((L, L), device=device, dtype=x["q"].dtype).masked_fill_(
                ~keep, float("-inf"))
        with _fused_sdpa(device):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=made["mask"],
                                                  scale=x["q"].shape[-1] ** -0.5)
    return Path("sdpa + mask", BASELINE, run)


def _fused_sdpa(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def _dense_path(B: int, H: int, L: int, D: int) -> Path:
    from graftfx.kernels.swa.naive import naive_swa as full_reference

    def run(x):
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], scale=D ** -0.5)

    def reference(x):                  # a window covering every token: full attention
        return full_reference(x["q"], x["k"], x["v"], x["q"].shape[-2], D ** -0.5)[0]

    def flops(pass_):
        fwd = 4 * B * H * L * L * D
        return fwd if pass_ == "fwd" else int(3.5 * fwd)
    return Path("sdpa (full)", DENSE, run, reference=reference, flops=flops)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def _linear_torch(x):
    """Non-causal linear attention as a user writes it: two matmuls in the run dtype."""
    fq, fk, v = _phi(x["q"]), _phi(x["k"]), x["v"]                          # (B, H, L, D)
    state = fk.transpose(-1, -2) @ v                                       # (B, H, D, D)
    den = fq @ fk.sum(-2, keepdim=True).transpose(-1, -2) + 1e-6           # (B, H, L, 1)
    return (fq @ state) / den                                              # (B, H, L, D)


def _fla_linear(x):
    """fla's linear-attention kernels are causal: the non-causal sums are the causal pass plus
    the pass over the reversed sequence, less the diagonal counted twice; the normaliser rides
    along as one more value column."""
    from fla.ops.linear_attn import chunk_linear_attn

    head_first = "head_first" in inspect.signature(chunk_linear_attn).parameters
    fq, fk, v = _phi(x["q"]), _phi(x["k"]), x["v"]                          # (B, H, L, D)
    vv = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)                 # (B, H, L, D+1)

    def causal(q, k, val):
        if head_first:
            return chunk_linear_attn(q, k, val, scale=1.0, normalize=False, head_first=True)[0]
        t = [a.transpose(1, 2).contiguous() for a in (q, k, val)]             # (B, L, H, .)
        return chunk_linear_attn(*t, scale=1.0, normalize=False)[0].transpose(1, 2)

    fwd = causal(fq, fk, vv)
    rev = causal(fq.flip(2), fk.flip(2), vv.flip(2)).flip(2)
    both = fwd + rev - (fq * fk).sum(-1, keepdim=True) * vv
    return both[..., :-1] / (both[..., -1:] + 1e-6)                          # (B, H, L, D)


def _ssd_args(x):
    return x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"]


def _mamba_ssm_scan(chunk: int):
    def run(x):
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        xs, dt, A, Bm, Cm, D = _ssd_args(x)
        return mamba_chunk_scan_combined(xs, dt, A, Bm, Cm, chunk, D=D)     # (B, L, H, P)
    return run


def _fla_ssd(x):
    """The SSD scan as fla's simple GLA: q = C, k = dt * B, v = x, log-decay g = dt * A."""
    from fla.ops.simple_gla import chunk_simple_gla

    xs, dt, A, Bm, Cm, D = _ssd_args(x)
    heads = xs.shape[2]
    Bh = Bm.repeat_interleave(heads // Bm.shape[2], dim=2)                  # (B, L, H, N)
    Ch = Cm.repeat_interleave(heads // Cm.shape[2], dim=2)
    kw = {"head_first": False} if "head_first" in inspect.signature(chunk_simple_gla).parameters else {}
    y = chunk_simple_gla(q=Ch, k=(Bh * dt[..., None]).to(xs.dtype), v=xs.contiguous(), g=dt * A,
                         scale=1.0, **kw)[0]
    return y + D[:, None] * xs                                              # (B, L, H, P)


def _conv1d_gate(x):
    """The unfused Hyena featurizer: depthwise F.conv1d (channels first), then q * (k * v)."""
    u, w, b = x["u"], x["weight"], x["bias"]
    L, taps = u.shape[1], w.shape[1]
    y = F.conv1d(u.transpose(1, 2), w.unsqueeze(1), b, padding=taps - 1, groups=w.shape[0])
    q, k, v = y[..., :L].chunk(3, dim=1)                                    # (B, d, L) each
    return (q * (k * v)).transpose(1, 2)                                     # (B, L, d)


def _causal_conv1d_gate(x):
    from causal_conv1d import causal_conv1d_fn

    u, w, b = x["u"], x["weight"], x["bias"]
    y = causal_conv1d_fn(u.transpose(1, 2), w.to(u.dtype), b.to(u.dtype), activation=None)
    q, k, v = y.chunk(3, dim=1)                                             # (B, d, L) each
    return (q * (k * v)).transpose(1, 2)                                     # (B, L, d)


def _optional(name: str, package: str, fn, cuda: bool, role: str = BASELINE) -> Path:
    if not cuda:
        return Path(name, role, None, "needs a CUDA GPU")
    if not _has(package):
        return Path(name, role, None, f"{package} is not installed")
    return Path(name, role, fn)


def paths_for(case, device: torch.device, dtype: torch.dtype) -> list[Path]:
    """The kernel, its baselines (each where it runs) and, on a CPU, the fp32 reference."""
    cuda = device.type == "cuda"
    d = case.dims
    out = [_kernel_path(case, device)]
    f = case.family
    if f in ("swa", "nat2d"):
        scale = d["D"] ** -0.5
        if f == "swa":
            from graftfx.kernels.swa.naive import swa_mask as keep

            mod = window_mask_mod(d["window"])
            mask_fn = lambda: keep(d["L"], d["window"], device)            # noqa: E731
        else:
            from graftfx.kernels.nat2d.naive import nat2d_mask as keep

            mod = neighbourhood_mask_mod(*d["grid"], d["kernel_size"])
            mask_fn = lambda: keep(*d["grid"], d["kernel_size"], device)   # noqa: E731
        out += [_flex_path(mod, d["L"], scale, device),
                _masked_sdpa_path(mask_fn, d["B"], d["H"], d["L"], dtype, device),
                _dense_path(d["B"], d["H"], d["L"], d["D"])]
    elif f == "linear_attn":
        out += [Path("torch matmuls", BASELINE, _linear_torch),
                _optional("fla chunk_linear_attn (causal + reversed)", "fla", _fla_linear, cuda),
                _dense_path(d["B"], d["H"], d["L"], d["D"])]
    elif f == "mamba2":
        out += [_optional("mamba_ssm chunk_scan_combined", "mamba_ssm", _mamba_ssm_scan(d["chunk"]), cuda),
                _optional("fla chunk_simple_gla", "fla", _fla_ssd, cuda)]
    elif f == "hyena_x":
        out += [Path("F.conv1d + gate", BASELINE, _conv1d_gate),
                _optional("causal_conv1d + gate", "causal_conv1d", _causal_conv1d_gate, cuda)]
    if not cuda:
        out.append(Path("reference (fp32)", REFERENCE, case.reference))
    return out


# ----------------------------------------------------------------------------- the output check
@dataclass
class Check:
    out: float | None = None                  # relative error of the output
    grad: float | None = None                 # worst relative error over the input gradients
    worst: str = ""                           # the gradient it belongs to
    error: str = ""                           # an exception instead of a result
    tol: float = 0.0

    def passes(self, pass_: str) -> bool:
        if self.error or self.out is None or not self.out <= self.tol:
            return False
        return pass_ == "fwd" or (self.grad is not None and self.grad <= 2 * self.tol)

    def text(self, pass_: str) -> str:
        """``ok: out 3.1e-03, dq 5.0e-03`` (the worst gradient), or ``FAILED: ...`` with the
        tolerances."""
        if self.error:
            return self.error
        if self.out is None:
            return "-"
        parts = [(f"out {self.out:.1e}", self.tol)]
        if pass_ != "fwd" and self.grad is not None:
            parts.append((f"{self.worst} {self.grad:.1e}", 2 * self.tol))
        if self.passes(pass_):
            return "ok: " + ", ".join(p for p, _ in parts)
        return "FAILED: " + ", ".join(f"{p} (tol {t:.0e})" for p, t in parts)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return math.inf
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def _prefix(t: torch.Tensor, shape) -> torch.Tensor:
    """The leading part of ``t`` of ``shape`` (the slice a reference sees: batch 0, two heads)."""
    if len(shape) != t.dim() or any(s > n for s, n in zip(shape, t.shape)):
        raise ValueError(f"reference shape {tuple(shape)} is not a leading slice of {tuple(t.shape)}")
    return t[tuple(slice(0, s) for s in shape)]


class Reference:
    """The fp32 reference of a case on the slice it may see, with one cotangent and its input
    gradients, computed once and shared by every path checked against it."""

    def __init__(self, case, inputs: dict, fn: Callable, backward: bool, dtype: torch.dtype,
                 seed: int = 1):
        sl = case.ref_slice or (lambda name, t: t)
        ref_in = {k: sl(k, v.detach()).float() for k, v in inputs.items()}
        if case.ref_inputs is not None:
            ref_in = case.ref_inputs(ref_in)
        self.names = [k for k in case.grads if k in ref_in] if backward else []
        ref_in = {k: (v.detach().clone().requires_grad_() if k in self.names else v)
                  for k, v in ref_in.items()}
        self.shapes = {k: tuple(v.shape) for k, v in ref_in.items()}
        y = fn(ref_in).float()
        g = torch.Generator().manual_seed(seed)
        # the cotangent rounded to the run dtype, so the path sees exactly the same one
        self.cot = torch.randn(y.shape, generator=g).to(dtype).float().to(y.device)
        self.grads = dict(zip(self.names, torch.autograd.grad(y, [ref_in[k] for k in self.names],
                                                              self.cot))) if self.names else {}
        self.out = y.detach()


def check_path(path: Path, inputs: dict, ref: Reference, tol: float) -> Check:
    """Run ``path`` once (forward, and backward when ``ref`` has gradients) and compare its
    output and input gradients with the reference's, on the reference's slice."""
    c = Check(tol=tol)
    with path.context():
        return _check_path(path, inputs, ref, c)


def _check_path(path: Path, inputs: dict, ref: Reference, c: Check) -> Check:
    x = {k: (v.detach().requires_grad_() if k in ref.names else v) for k, v in inputs.items()}
    y = path.fn(x)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{path.name} returned {type(y).__name__}, not a tensor")
    if y.dim() != ref.out.dim():
        raise ValueError(f"{path.name} output shape {tuple(y.shape)} does not match the "
                         f"reference's {tuple(ref.out.shape)}")
    c.out = _rel(_prefix(y, ref.out.shape).float(), ref.out)
    if ref.names:
        cot = torch.zeros(y.shape, device=y.device, dtype=y.dtype)
        _prefix(cot, ref.cot.shape).copy_(ref.cot)
        got = torch.autograd.grad(y, [x[k] for k in ref.names], cot, allow_unused=True)
        errs = {}
        for k, g in zip(ref.names, got):
            errs[k] = math.inf if g is None else _rel(_prefix(g, ref.shapes[k]).float(), ref.grads[k])
        c.worst = max(errs, key=errs.get)
        c.grad = errs[c.worst]
        c.worst = f"d{c.worst}"
    return c


def tiny_cases() -> list:
    """One tiny shape per family for the interpreter check (head dim 72 as in the bench)."""
    return [kc.hyena_x_case(16, B=1, width=16), kc.swa_case(16, 72, 4, B=1, width=72),
            kc.nat2d_case(4, 72, 3, B=1, width=72), kc.linear_attn_case(16, 72, B=1, width=72),
            kc.mamba2_case(32, B=1, width=32, d_state=16, chunk=16)]


def _interpreter_checks_here(families=None) -> dict[str, dict]:
    cpu = torch.device("cpu")
    out = {}
    for case in tiny_cases():
        if families and case.family not in families:
            continue
        inputs = case.make(cpu, torch.float32, seed=0)
        path = Path("graftfx", KERNEL, case.run, mode="triton")
        try:
            ref = Reference(case, inputs, case.reference, True, torch.float32)
            c = check_path(path, inputs, ref, TOL["fp32"])
        except Exception as e:  # one broken kernel must not hide the others
            c = Check(error=f"failed: {_one_line(e)}", tol=TOL["fp32"])
        out[case.family] = {**asdict(c), "case": case.label}
    return out


def interpreter_checks(families=None, timeout_s: float = 300) -> dict[str, dict]:
    """The Triton path of every family checked at a tiny shape through Triton's CPU interpreter:
    in this process when it interprets already (``TRITON_INTERPRET=1`` before the kernels were
    imported), else in a child process that sets it. {family: Check fields + case label}."""
    from graftfx.kernels._dispatch import interpreting

    if interpreting():
        return _interpreter_checks_here(families)
    env = {**os.environ, "TRITON_INTERPRET": "1", "GRAFTFX_KERNELS": "auto"}
    code = ("import json, sys; from graftfx.bench.kernels import _interpreter_checks_here; "
            "print('GRAFTFX-JSON' + json.dumps(_interpreter_checks_here(sys.argv[1:] or None)))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, *(families or [])], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {f: {**asdict(Check(error=f"failed: interpreter check ran past {timeout_s:g} s")),
                    "case": ""} for f in (families or FAMILIES)}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GRAFTFX-JSON")), None)
    if line is None:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {f: {**asdict(Check(error=f"failed: interpreter check process: {why}")), "case": ""}
                for f in (families or FAMILIES)}
    return json.loads(line[len("GRAFTFX-JSON"):])


# ----------------------------------------------------------------------------- timing
@dataclass
class Row:
    kernel: str                      # family
    case: str                        # e.g. "swa w=4 L=16384 hd=72"
    group: str                       # pixart-2048, swa sweep, ...
    path: str
    role: str                        # kernel | baseline | dense | reference
    dtype: str
    pass_: str
    dims: dict = field(default_factory=dict)
    status: str = "ok"               # ok | skipped: why | failed check | failed: why | out of memory
    check: str = ""                  # the output check, as text
    ms: float | None = None
    ms_min: float | None = None
    flops: int | None = None
    bytes: int | None = None
    gbps: float | None = None
    tflops: float | None = None
    graphed: bool = False            # timed as a CUDA graph replay
    speedup: float | None = None     # baselines: this ms / the kernel's ms (the kernel's speed-up)
    best: str = ""                   # the kernel row: its fastest baseline ...
    vs_best: float | None = None     # ... and that baseline's ms / the kernel's ms

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        d["dims"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["dims"].items()}
        return d


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:limit]}"


def _release(device: torch.device) -> None:
    from .runner import release_memory

    release_memory(device)


def _graph(step: Callable[[], None], leaves: list) -> Callable[[], None]:
    """``step`` captured as one CUDA graph (after a warm-up on a side stream); returns replay.
    The leaves' gradients are None at capture, so the graph owns fresh .grad buffers that every
    replay overwrites (as a plain call after ``grad = None`` would allocate them)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_path(path: Path, inputs: dict, names: list[str], pass_: str, device: torch.device,
              timer, graphs: bool = False) -> tuple[Timing, bool]:
    """Median ms of ``path.fn(inputs)`` (fwd: no_grad) or of it plus ``backward(dy)``; a CUDA
    graph replay when ``graphs`` (falling back to plain calls if capture fails)."""
    if pass_ == "fwd":
        def step():
            with torch.no_grad(), path.context():
                path.fn(inputs)
        leaves: list = []
    else:
        x = {k: (v.detach().requires_grad_() if k in names else v) for k, v in inputs.items()}
        with path.context():
            dy = torch.randn_like(path.fn(x))
        leaves = [x[k] for k in names]

        def step():
            with path.context():
                path.fn(x).backward(dy)
    graphed = False
    fn = step
    if graphs and device.type == "cuda":
        try:
            fn, graphed, leaves = _graph(step, leaves), True, []
        except Exception:  # capture refused (a host sync, a non-capturable op): time plain calls
            torch.cuda.synchronize()
            fn = step
    return time_callable(fn, device, warmup_ms=timer.warmup_ms, rep_ms=timer.rep_ms,
                         grad_to_none=leaves), graphed


class KernelBench:
    """Checks and times every path of every planned case, within an optional time budget."""

    def __init__(self, device: torch.device, dtype: torch.dtype, timer, passes=PASSES, *,
                 graphs: bool = False, budget_s: float | None = None, progress=None,
                 interpreter: dict | None = None):
        self.device, self.dtype, self.timer, self.passes = device, dtype, timer, tuple(passes)
        self.graphs, self.budget_s, self.progress = graphs, budget_s, progress
        self.interpreter = interpreter or {}
        self.start = time.monotonic()
        self.tol = TOL[dtype_name(dtype)]
        self.elem = torch.empty((), dtype=dtype).element_size()

    def _tick(self, what: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(what[:40])
            self.progress.update(1)

    def _over_budget(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.start > self.budget_s

    def units(self, planned) -> int:
        return sum(len(paths_for(c, self.device, self.dtype)) for _, c in planned) * len(self.passes)

    def run(self, planned) -> list[Row]:
        rows: list[Row] = []
        for group, case in planned:
            rows += self.case(group, case)
        return rows

    def case(self, group: Group, case) -> list[Row]:
        elem = self.elem
        paths = paths_for(case, self.device, self.dtype)
        rows: list[Row] = []
        refs: dict = {}
        backward = "fwd+bwd" in self.passes
        inputs = None
        for path in paths:
            made = [self._row(group, case, path, p, elem) for p in self.passes]
            rows += made
            if path.skip or self._over_budget():
                for r in made:
                    r.status = (f"skipped: {path.skip}" if path.skip else
                                f"skipped: the --budget-s {self.budget_s:g} s was spent")
                self._interpreted(case, path, made)
                self._ticks(made)
                continue
            try:
                if inputs is None:
                    inputs = case.make(self.device, self.dtype, seed=0)
                bwd = backward and not path.no_backward
                key = (id(path.reference), bwd)
                if key not in refs:
                    refs[key] = Reference(case, inputs, path.reference or case.reference, bwd, self.dtype)
                check = check_path(path, inputs, refs[key], self.tol)
            except torch.OutOfMemoryError:
                check = Check(error="out of memory", tol=self.tol)
            except Exception as e:  # a broken path must not end the run
                check = Check(error=f"failed: {_one_line(e)}", tol=self.tol)
            _release(self.device)
            for r in made:
                self._measure(r, path, check, inputs, case)
                self._tick(f"{case.label} {path.name} {r.pass_}")
        _compare(rows)
        inputs, refs = None, None
        _release(self.device)
        return rows

    def _ticks(self, made) -> None:
        for r in made:
            self._tick(f"{r.case} {r.path} {r.pass_}")

    def _interpreted(self, case, path: Path, made: list[Row]) -> None:
        """CPU: the kernel row carries the interpreter check of its family."""
        found = self.interpreter.get(case.family) if path.role == KERNEL else None
        if not found:
            return
        c = Check(**{k: found[k] for k in ("out", "grad", "worst", "error", "tol")})
        for r in made:
            r.check = f"interpreter, {found['case']}: {c.text(r.pass_)}"
            if not c.passes(r.pass_):
                r.status = "failed check (Triton interpreter, tiny shape)"

    def _row(self, group: Group, case, path: Path, pass_: str, elem: int) -> Row:
        flops = (path.flops or case.flops)(pass_)
        return Row(case.family, case.label, group.name, path.name, path.role,
                   dtype_name(self.dtype), pass_, dict(case.dims), flops=int(flops),
                   bytes=int(case.bytes(pass_, elem)))

    def _measure(self, r: Row, path: Path, check: Check, inputs, case) -> None:
        if r.pass_ == "fwd+bwd" and path.no_backward:
            r.status = f"skipped: {path.no_backward}"
            r.check = check.text("fwd")
            return
        r.check = check.text(r.pass_)
        if check.error:
            r.status = check.error if check.error.startswith(("failed", "out of memory")) else \
                f"failed: {check.error}"
            return
        if not check.passes(r.pass_):
            r.status = "failed check"
            return
        if self._over_budget():
            r.status = f"skipped: the --budget-s {self.budget_s:g} s was spent"
            return
        names = [k for k in case.grads if k in inputs]
        small = case.bytes("fwd", self.elem) <= CUDA_GRAPH_MAX_BYTES
        try:
            timing, r.graphed = time_path(path, inputs, names, r.pass_, self.device, self.timer,
                                          graphs=self.graphs and small)
            r.ms, r.ms_min = timing.ms, timing.ms_min
            seconds = r.ms * 1e-3
            r.gbps = r.bytes / seconds / 1e9
            r.tflops = r.flops / seconds / 1e12
        except torch.OutOfMemoryError:
            r.status = "out of memory"
        except Exception as e:
            r.status = f"failed: {_one_line(e)}"
        finally:
            _release(self.device)


def _compare(rows: list[Row]) -> None:
    """Per pass: each baseline's ms over the kernel's, and the kernel's best baseline."""
    for pass_ in PASSES:
        mine = [r for r in rows if r.pass_ == pass_]
        kernel = next((r for r in mine if r.role == KERNEL and r.ok and r.ms), None)
        bases = [r for r in mine if r.role in (BASELINE, DENSE) and r.ok and r.ms]
        if kernel is None:
            continue
        for b in bases:
            b.speedup = b.ms / kernel.ms
        if bases:
            best = min(bases, key=lambda b: b.ms)
            kernel.best, kernel.vs_best = best.path, best.ms / kernel.ms


# ----------------------------------------------------------------------------- targets
def targets(rows: list[Row], ceilings: Ceilings | None, cuda: bool) -> list[dict]:
    """The issue's targets as ratios of this run: {target, value, need, met, text}; ``met`` is
    None where the run has no number for it (a CPU, a skipped or failed path)."""
    out = []

    def add(target, value, need, fmt="x", detail=""):
        met = None if value is None else value >= need
        if not cuda:
            text = f"n/a ({CPU_NOTE})"
        elif value is None:
            text = f"n/a: {detail or 'a path was skipped or failed'}"
        else:
            shown = f"{value:.0%}" if fmt == "%" else f"{value:.2f}x"
            text = f"{shown} ({'met' if met else 'not met'}{'; ' + detail if detail else ''})"
        out.append({"target": target, "value": value, "need": need, "met": met if cuda else None,
                    "text": text})

    def pick(**kw):
        return [r for r in rows if all(getattr(r, k) == v for k, v in kw.items())]

    main = rows[0].group if rows else None          # the first planned group: the PixArt shape
    families = {r.kernel for r in rows}
    if "hyena_x" in families:
        _hyena_targets(add, pick, main, ceilings)
    if "swa" in families:
        _swa_targets(add, pick, rows)
    for r in (r for r in rows if r.role == KERNEL and r.group == main):
        ratio = r.vs_best
        detail = (f"best baseline {r.best}" + ("" if ratio is None or ratio >= 1 else
                                              f"; the kernel is {1 / ratio - 1:.0%} slower")
                  if r.best else "no baseline timed")
        add(f"{r.kernel} at least as fast as its best baseline at {main} {r.pass_}",
            ratio, 1.0, detail=detail)
    return out


def _hyena_targets(add, pick, main, ceilings) -> None:
    fused = next((r for r in pick(kernel="hyena_x", role=KERNEL, pass_="fwd+bwd", group=main)
                  if r.ok), None)
    bw = fused.gbps / ceilings.gbps if fused and ceilings else None
    add("Hyena featurizer fwd+bwd >= 80% of the measured copy bandwidth", bw, 0.8, "%",
        f"{fused.gbps:,.0f} of {ceilings.gbps:,.0f} GB/s" if bw is not None else "")
    unfused = next((r for r in pick(kernel="hyena_x", path="F.conv1d + gate", pass_="fwd+bwd",
                                    group=main) if r.ok), None)
    add("Hyena featurizer fwd+bwd >= 2x the unfused F.conv1d + gate",
        unfused.ms / fused.ms if fused and unfused else None, 2.0)


def _swa_targets(add, pick, rows) -> None:
    lo_w, hi_w = SWA_WINDOWS[0], SWA_WINDOWS[-1]
    lo_l, hi_l = SWA_LENGTHS[0], SWA_LENGTHS[-1]
    sweep = [r for r in rows if r.kernel == "swa" and r.role == KERNEL
             and lo_w <= r.dims["window"] <= hi_w and lo_l <= r.dims["L"] <= hi_l]
    for r in sweep:
        flex = next((b for b in pick(case=r.case, pass_=r.pass_, group=r.group)
                     if b.path.startswith("flex_attention")), None)
        ratio = flex.ms / r.ms if flex is not None and flex.ok and r.ok else None
        add(f"swa faster than flex_attention: w={r.dims['window']} L={r.dims['L']} {r.pass_}",
            ratio, 1.0, detail="" if ratio is not None else
            f"flex_attention {flex.status if flex else 'absent'}; graftfx {r.status}")
    if not sweep:
        add(f"swa faster than flex_attention at w = {lo_w}..{hi_w}, L = {lo_l}..{hi_l}", None, 1.0,
            detail="no swa case in that range in this run")
