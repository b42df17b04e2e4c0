"""The operator protocol: what every replacement operator is and offers (torchao-style).

An operator is an ``nn.Module`` subclass of :class:`Operator`, registered under a name with its
config dataclass (``graftfx.registry.register_operator``)::

    @register_operator("swa", config=SWAConfig, kinds=("self_attention",), loss="l1")
    class SlidingWindowAttention(AttentionOperator): ...

What the engine relies on:

- ``from_region(region, config)`` (classmethod) builds the operator for one matched ``Region``
  from the validated config object. ``config.__post_init__`` checks each option alone; what
  depends on the region (heads dividing the width, a token grid) is checked here and raised as
  ``ValueError``, which the splicer turns into a ``GraftError`` naming the rule and the region.
- ``self.config`` is that config object; the graft manifest stores ``dataclasses.asdict`` of it,
  so a reloaded model is rebuilt from the options it was trained with, whatever the defaults.
- ``forward(x)`` (or ``forward(x, context)`` for cross-attention): (B, L, width) ->
  (B, L, out_width), any batch size.
- ``flops(tokens)``: matmul-class FLOPs per sample (2 per multiply-add).

What the benchmark relies on (``graftfx.bench`` never names an operator):

- ``kernel(...)`` is the fused core the operator's forward calls; ``kernel_reference(...)`` the
  same computation through the plain-PyTorch references (``graftfx.kernels.<op>.naive``).
  ``reference()`` is the operator with the second in place of the first, sharing the weights.
  Operators whose core is plain PyTorch define no reference; ``has_reference()`` is False.
- ``backends``: optional packages that can run the core, each with the options selecting it.
- ``bench_options``: the option sets worth timing (default: the defaults only).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from graftfx.options import check_choice, check_int

INITS = ("copy", "fresh")


@dataclass(frozen=True)
class Backend:
    """An optional package that runs an operator's core: selected by ``options``, usable on CUDA
    tensors of ``dtypes`` (empty: any dtype)."""

    package: str                     # import name: flash_attn, mamba_ssm, causal_conv1d
    options: dict
    dtypes: tuple[torch.dtype, ...] = ()


class Operator(nn.Module):
    """Base of every replacement operator (see the module notes for the protocol)."""

    operator_name: ClassVar[str]          # set by register_operator
    config_class: ClassVar[type]          # set by register_operator
    backends: ClassVar[tuple[Backend, ...]] = ()
    bench_options: ClassVar[tuple[dict, ...]] = ({},)

    def kernel(self, *inputs):
        raise TypeError(f"{type(self).__name__} has no kernel: it is plain PyTorch")

    def kernel_reference(self, *inputs):
        raise TypeError(f"{type(self).__name__} has no kernel reference: it is plain PyTorch")

    @classmethod
    def has_reference(cls) -> bool:
        """True when the core runs graftfx kernels that have a plain-PyTorch reference."""
        return cls.kernel_reference is not Operator.kernel_reference

    def reference(self) -> nn.Module:
        """This operator computing through the plain-PyTorch references (the same parameter
        tensors); the operator itself when its core is plain PyTorch."""
        if not self.has_reference():
            return self
        ref = copy.copy(self)                  # shares parameters, buffers and submodules
        ref.kernel = ref.kernel_reference
        return ref

    def options(self) -> dict:
        """The config as plain data (what the manifest stores)."""
        return dataclasses.asdict(self.config)


# ---------------------------------------------------------------------------------------------
# Attention family: q/k/v/out projections and head bookkeeping around a per-head core
# ---------------------------------------------------------------------------------------------

@dataclass
class AttentionConfig:
    """Options every attention-family operator has; subclasses add their own."""

    heads: int | None = None       # default: the region's head count (else DEFAULT_HEADS)
    init: str = "copy"             # "copy" the original q/k/v/out (Region.weights), or "fresh"

    def __post_init__(self):
        check_int("heads", self.heads, 1, optional=True)
        check_choice("init", self.init, INITS)


class HeadNorm(nn.Module):
    """A q/k norm taken from the original: LayerNorm or RMSNorm over the head dim or the width."""

    def __init__(self, kind: str, shape: int, eps: float | None, weight=None, bias=None):
        super().__init__()
        self.kind, self.shape, self.eps = kind, shape, eps
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x):
        if self.kind == "rms_norm":
            return F.rms_norm(x, (self.shape,), self.weight, self.eps)     # eps None: the dtype's epsilon
        return F.layer_norm(x, (self.shape,), self.weight, self.bias, 1e-5 if self.eps is None else self.eps)


class AttentionOperator(Operator):
    """q/k/v projections -> ``kernel(q, k, v)`` per head -> output projection.

    Self-attention packs the projections in one ``qkv`` linear (width -> 3 width: q | k | v,
    each with heads in order); cross-attention has ``q`` (width -> width) and ``kv``
    (context width -> 2 width). ``proj``: width -> out width. With ``init="copy"`` all of them,
    the original's q/k norms and its softmax scale come from ``Region.weights``; subclasses
    define ``kernel(q, k, v)`` on (B, H, L, Dh) tensors returning (B, H, L, Dh), and may read
    ``self.scale`` (None: 1/sqrt(Dh)).
    """

    DEFAULT_HEADS: ClassVar[int] = 16
    max_head_dim: ClassVar[int] = 256

    def __init__(self, width: int, config: AttentionConfig, *, heads: int | None = None,
                 out_width: int | None = None, context_width: int | None = None, grid=None):
        super().__init__()
        self.config, self.grid = config, tuple(grid) if grid is not None else None
        self.heads = self.resolve_heads(width, config.heads or heads or self.DEFAULT_HEADS)
        self.width, self.head_dim = width, width // self.heads
        self.cross = context_width is not None
        if self.cross:
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(context_width, 2 * width)
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, out_width or width)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        self.scale: float | None = None

    @classmethod
    def resolve_heads(cls, width: int, heads: int) -> int:
        if width % heads:
            raise ValueError(f"heads={heads} must divide the width {width}; set the heads option "
                             f"to a divisor of {width}")
        if width // heads > cls.max_head_dim:
            raise ValueError(f"heads={heads} gives head dim {width // heads} > {cls.max_head_dim}; "
                             f"set the heads option higher")
        return heads

    @classmethod
    def from_region(cls, region, config):
        op = cls(region.width, config, heads=region.heads, out_width=region.out_width or None,
                 context_width=region.context_width, grid=region.grid)
        if config.init == "copy":
            op.copy_from(region)
        return op

    @torch.no_grad()
    def copy_from(self, region) -> None:
        """Load q/k/v/out (heads in order), the q/k norms and the scale from ``Region.weights``."""
        w = region.weights
        missing = [f"{n}.weight" for n in ("q", "k", "v", "out") if f"{n}.weight" not in w]
        if missing:
            raise ValueError(f"init='copy' needs the original attention weights ({', '.join(missing)} "
                             f"missing from the region); use init='fresh'")
        if region.heads is not None and self.heads != region.heads:
            raise ValueError(f"init='copy' needs the original heads={region.heads}, got heads={self.heads}; "
                             f"drop the heads option or use init='fresh'")

        def rows(names, layer):
            weight = torch.cat([w[f"{n}.weight"] for n in names])
            if weight.shape != layer.weight.shape:
                raise ValueError(f"init='copy': the original {'/'.join(names)} weights {tuple(weight.shape)} do "
                                 f"not fit this operator's {tuple(layer.weight.shape)}; use init='fresh'")
            layer.weight.copy_(weight)
            size = layer.out_features // len(names)
            layer.bias.copy_(torch.cat([w.get(f"{n}.bias", layer.bias.new_zeros(size)) for n in names]))

        if self.cross:
            rows(("q",), self.q)
            rows(("k", "v"), self.kv)
        else:
            rows(("q", "k", "v"), self.qkv)
        rows(("out",), self.proj)
        for name in ("q", "k"):
            norm = region.details.get(f"{name}_norm")
            if norm:
                weight, bias = w.get(f"{name}_norm.weight"), w.get(f"{name}_norm.bias")
                setattr(self, f"{name}_norm", HeadNorm(norm["kind"], norm["shape"], norm["eps"], weight, bias))
        scale = region.details.get("scale")
        self.scale = float(scale) if scale is not None and not math.isclose(scale, self.head_dim ** -0.5) else None

    def _split(self, t: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        B, L, _ = t.shape
        if norm is not None and norm.shape != self.head_dim:
            t, norm = norm(t), None            # a norm over the whole width, before the head split
        t = t.view(B, L, self.heads, self.head_dim).transpose(1, 2)     # (B, H, L, Dh)
        return norm(t) if norm is not None else t

    def project(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """q, k, v as (B, H, L, Dh) (k, v: (B, H, S, Dh) for cross-attention)."""
        x = x.to(self.proj.weight.dtype)
        if self.cross:
            q = self.q(x)                                                 # (B, L, D)
            k, v = self.kv(context.to(x.dtype)).chunk(2, dim=-1)          # (B, S, D) each
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)                        # (B, L, D) each
        return self._split(q, self.q_norm), self._split(k, self.k_norm), self._split(v, None)

    def merge(self, o: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        B, H, L, Dh = o.shape
        y = self.proj(o.to(self.proj.weight.dtype).transpose(1, 2).reshape(B, L, H * Dh))
        return y.to(like.dtype)                                           # (B, L, out)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x, context)                                # (B, H, L, Dh)
        return self.merge(self.kernel(q, k, v), x)                        # (B, L, out)

    def projection_flops(self, tokens: int, context_tokens: int | None = None) -> int:
        d, out = self.width, self.proj.out_features
        if self.cross:
            s = context_tokens or tokens
            return 2 * tokens * d * d + 2 * s * self.kv.in_features * 2 * d + 2 * tokens * d * out
        return 2 * tokens * d * 3 * d + 2 * tokens * d * out

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())
        return f"heads={self.heads}, head_dim={self.head_dim}, {fields}"
