"""Shared pieces of the operator tests: regions (hand-made and traced from real attention
modules), building through the registry, and the Triton-path-versus-reference comparison.

The Triton path runs through the interpreter (``TRITON_INTERPRET=1``, tests/conftest.py) under
``kernels("triton")``. ``triton_path()`` also counts the Triton launches, so a comparison can
never silently compare the PyTorch reference with itself (what ``auto`` does on a CPU).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import graftfx
from graftfx.kernels._dispatch import kernels
from graftfx.match.region import Region
from graftfx.registry import get_operator


# --------------------------------------------------------------------------------- regions
def region(width=16, tokens=9, heads=2, *, kind="self_attention", grid=None, out_width=None,
           weights=None, details=None, hidden=None, activation=None) -> Region:
    """A hand-made region (no graph): what ``from_region`` reads."""
    return Region(path="blocks.1.mlp" if kind == "mlp" else "blocks.1.attn", kind=kind, pattern=kind,
                  input=None, output=None, nodes=(), width=width, out_width=out_width or width,
                  tokens=tokens, grid=grid, heads=heads, head_dim=width // heads if heads else None,
                  hidden=hidden, activation=activation, weights=weights or {}, details=details or {})


def build(name: str, reg: Region, **options):
    """``name``'s operator for ``reg`` with a config validated by the registry."""
    spec = get_operator(name)
    return spec.cls.from_region(reg, spec.make_config(options))


class _Self(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x)


class _Cross(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, context):
        return self.attn(x, context)


def traced_region(module: nn.Module, *inputs, kind: str | None = None, grid=None) -> Region:
    """The one region the built-in pattern finds in ``module`` (traced at ``inputs``)."""
    kind = kind or ("cross_attention" if len(inputs) == 2 else "self_attention")
    wrap = _Cross(module) if len(inputs) == 2 else _Self(module)
    report = graftfx.match(graftfx.trace(wrap, inputs, grid=grid), kind)
    assert len(report.regions) == 1, report
    return report.regions[0]


# --------------------------------------------------------------------------------- originals
def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)                 # (B, H, L, Dh)


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    return o.transpose(1, 2).flatten(2)                                 # (B, L, D)


class SelfAttention(nn.Module):
    """Self-attention written as other models write it: fused qkv, optional q/k norms
    (LayerNorm or RMSNorm, over the head dim or the whole width, random affine parameters),
    any softmax scale, sdpa or an explicit softmax, output projection to ``out_width``."""

    def __init__(self, width=16, heads=2, *, norm=None, over="head", scale=None, explicit=False,
                 out_width=None):
        super().__init__()
        self.heads, self.scale, self.over, self.explicit = heads, scale, over, explicit
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, out_width or width)
        self.q_norm = self.k_norm = None
        if norm is not None:
            shape = width // heads if over == "head" else width
            make = {"layer_norm": nn.LayerNorm, "rms_norm": nn.RMSNorm}[norm]
            self.q_norm, self.k_norm = make(shape, eps=1e-5), make(shape, eps=1e-5)
            with torch.no_grad():
                for n in (self.q_norm, self.k_norm):
                    n.weight.uniform_(0.5, 1.5)
                    if getattr(n, "bias", None) is not None:
                        n.bias.uniform_(-0.3, 0.3)

    def qkv_heads(self, x):
        """The original's own q, k, v per head (after its norms), (B, H, L, Dh) each."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.q_norm is not None and self.over == "width":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        if self.q_norm is not None and self.over == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x):
        q, k, v = self.qkv_heads(x)
        if self.explicit:
            scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
            o = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(merge_heads(o))


class CrossAttention(nn.Module):
    """diffusers-style cross-attention: separate to_q/to_k/to_v/to_out, a context of its own width."""

    def __init__(self, width=16, context_width=12, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_out = nn.Linear(width, width), nn.Linear(width, width)
        self.to_k, self.to_v = nn.Linear(context_width, width), nn.Linear(context_width, width)

    def forward(self, x, context):
        q = split_heads(self.to_q(x), self.heads)
        k, v = split_heads(self.to_k(context), self.heads), split_heads(self.to_v(context), self.heads)
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


def dit_qkv_heads(attn, x):
    """q, k, v per head of graftfx.models.dit.Attention, written out."""
    B, L, D = x.shape
    qkv = attn.qkv(x).reshape(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


# --------------------------------------------------------------------------------- Triton path
@contextlib.contextmanager
def triton_path(expect_launch: bool = True):
    """``kernels("triton")`` with a record of the Triton kernels launched inside (the names).

    On exit: at least one launch (``expect_launch``) or none at all (``expect_launch=False``:
    e.g. a reference that must stay plain PyTorch even when Triton is asked for)."""
    from triton.runtime.interpreter import InterpretedFunction

    launched: list[str] = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        with kernels("triton"):
            yield launched
    finally:
        InterpretedFunction.run = original
    if expect_launch:
        assert launched, "no Triton kernel ran: this compared the PyTorch reference with itself"
    else:
        assert not launched, f"Triton kernels ran where only PyTorch should: {launched}"


def grads(y, inputs, cotangent):
    return torch.autograd.grad(y, inputs, cotangent, allow_unused=True)


def assert_triton_matches_reference(op, *inputs, atol=1e-5, rtol=1e-4):
    """The operator on the Triton path against ``op.reference()``: the output and the gradients
    of every input and every parameter (a random cotangent, so no gradient is a plain sum).
    Returns the Triton kernels launched."""
    ref = op.reference()
    assert ref is not op, "reference() must be a separate module computing through the reference"
    names, params = zip(*op.named_parameters())
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    with triton_path() as launched:
        y = op(*xs)
        cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
        got = grads(y, [*xs, *params], cot)
    with triton_path(expect_launch=False):            # the reference never takes the kernels
        y_ref = ref(*xs)
        want = grads(y_ref, [*xs, *params], cot)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol, msg=lambda m: f"output: {m}")
    labels = [f"d input {i}" for i in range(len(xs))] + [f"d {n}" for n in names]
    for label, g, w in zip(labels, got, want):
        assert w is not None and w.abs().sum() > 0, f"{label}: no gradient on the reference path"
        assert g is not None, f"{label}: no gradient on the Triton path"
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, label=label: f"{label}: {m}")
    return launched


def flop_count(fn, *args) -> int:
    """What torch's FLOP counter counts while ``fn(*args)`` runs (no autograd)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()
