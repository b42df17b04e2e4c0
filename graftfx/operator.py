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
  (B, L, out_width), any batch size. Joint attention over two streams: ``forward(x, context)``
  -> ``(x_out, context_out)``. The region's extra inputs the operator declares in ``takes``
  ("mask", "bias", "rope") come as keyword arguments (``Region.extra_inputs`` names them).
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
    # What beyond its input the operator takes from a region (graftfx.match.region.feature_of):
    # "mask" (key padding), "bias" (additive score terms), "rope" (rotary tables). The splicer
    # passes it only these; select refuses it for a region with a mask it does not take.
    takes: ClassVar[frozenset] = frozenset()

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
    """q/k/v projections -> [rotary embedding] -> ``kernel(q, k, v)`` per head -> output projection.

    Self-attention packs the projections in one ``qkv`` linear (width -> 3 width: q | k | v,
    each with heads in order); cross-attention has ``q`` (width -> width) and ``kv``
    (context width -> 2 width). ``proj``: width -> out width (None when the original's merged
    heads leave without a projection, as in Flux's single blocks). Joint attention over two
    streams (MMDiT) adds ``context_qkv`` and ``context_proj`` for the second stream; q, k, v of
    both streams are concatenated along the tokens in the original's order, the core runs over
    the joint sequence (``joint_kernel``, by default ``kernel``) and the output is cut back into
    the streams: ``forward(x, context)`` returns ``(x_out, context_out)``.

    With ``init="copy"`` all of them, the original's q/k norms (per stream) and its softmax
    scale come from ``Region.weights``. Rotary embeddings (``Region.details["rope"]``) are
    applied by this base to q and k before the core, for every subclass (``takes`` has
    "rope"); masks and additive biases only by operators that declare them. Subclasses define
    ``kernel(q, k, v)`` on (B, H, L, Dh) tensors returning (B, H, L, Dh), and may read
    ``self.scale`` (None: 1/sqrt(Dh)).
    """

    DEFAULT_HEADS: ClassVar[int] = 16
    max_head_dim: ClassVar[int] = 256
    takes: ClassVar[frozenset] = frozenset({"rope"})

    def __init__(self, width: int, config: AttentionConfig, *, heads: int | None = None,
                 out_width: int | None = None, context_width: int | None = None, grid=None,
                 joint: bool = False, out_proj: bool = True, context_out: bool = True):
        super().__init__()
        self.config, self.grid = config, tuple(grid) if grid is not None else None
        self.heads = self.resolve_heads(width, config.heads or heads or self.DEFAULT_HEADS)
        self.width, self.head_dim = width, width // self.heads
        self.joint = joint and context_width is not None          # two streams, each projected
        self.cross = context_width is not None and not self.joint
        if self.cross:
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(context_width, 2 * width)
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, out_width or width) if out_proj else None
        if self.joint:
            self.context_qkv = nn.Linear(context_width, 3 * width)
            self.context_proj = nn.Linear(width, context_width) if context_out else None
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        self.context_q_norm: nn.Module | None = None
        self.context_k_norm: nn.Module | None = None
        self.scale: float | None = None
        self.rope: dict | None = None          # {"style": "half"|"interleaved", "layout": "BHLD"|"BLHD", "k": bool}
        self.causal = False
        self.bias_steps: list | None = None    # additive terms before the softmax (operators that take "bias")
        self.scores_rank = 4                   # the original's scores: (B, H, L, S), or 3: (B*H, L, S)
        self.order = ("x", "context")          # joint: which stream comes first in the sequence

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
        details = region.details
        joint = region.kind == "joint_attention" and region.context is not None
        op = cls(region.width, config, heads=region.heads, out_width=region.out_width or None,
                 context_width=region.context_width, grid=region.grid, joint=joint,
                 out_proj=details.get("out_proj", True), context_out="context" in region.extra_outputs)
        op.rope = dict(details["rope"]) if details.get("rope") else None
        op.causal = bool(details.get("causal"))
        op.bias_steps = [tuple(s) for s in details["bias_steps"]] if details.get("bias_steps") else None
        op.scores_rank = int(details.get("scores_rank", 4))
        if joint:
            op.order = tuple(name for name, _ in details["segments"])
        if config.init == "copy":
            op.copy_from(region)
        return op

    @torch.no_grad()
    def copy_from(self, region) -> None:
        """Load q/k/v/out (heads in order), the q/k norms and the scale from ``Region.weights``."""
        w = region.weights
        missing = [f"{n}.weight" for n in ("q", "k", "v") + (("out",) if self.proj is not None else ())
                   if f"{n}.weight" not in w]
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
        if self.proj is not None:
            rows(("out",), self.proj)
        prefixes = ("", "context_") if self.joint else ("",)
        if self.joint:
            rows(("context_q", "context_k", "context_v"), self.context_qkv)
            if self.context_proj is not None:
                rows(("context_out",), self.context_proj)
        for prefix in prefixes:
            for name in ("q", "k"):
                norm = region.details.get(f"{prefix}{name}_norm")
                if norm:
                    weight, bias = w.get(f"{prefix}{name}_norm.weight"), w.get(f"{prefix}{name}_norm.bias")
                    setattr(self, f"{prefix}{name}_norm", HeadNorm(norm["kind"], norm["shape"], norm["eps"], weight, bias))
        scale = region.details.get("scale")
        self.scale = float(scale) if scale is not None and not math.isclose(scale, self.head_dim ** -0.5) else None

    @property
    def _dtype(self) -> torch.dtype:
        return (self.q if self.cross else self.qkv).weight.dtype

    def _split(self, t: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        B, L, _ = t.shape
        if norm is not None and norm.shape != self.head_dim:
            t, norm = norm(t), None            # a norm over the whole width, before the head split
        t = t.view(B, L, self.heads, self.head_dim).transpose(1, 2)     # (B, H, L, Dh)
        return norm(t) if norm is not None else t

    def project(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """q, k, v as (B, H, L, Dh) (k, v: (B, H, S, Dh) for cross-attention; joint: over the
        joint sequence of both streams, in the original's order)."""
        x = x.to(self._dtype)
        if self.cross:
            q = self.q(x)                                                 # (B, L, D)
            k, v = self.kv(context.to(x.dtype)).chunk(2, dim=-1)          # (B, S, D) each
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)                        # (B, L, D) each
        q, k, v = self._split(q, self.q_norm), self._split(k, self.k_norm), self._split(v, None)
        if not self.joint:
            return q, k, v
        cq, ck, cv = self.context_qkv(context.to(x.dtype)).chunk(3, dim=-1)
        cq, ck, cv = self._split(cq, self.context_q_norm), self._split(ck, self.context_k_norm), self._split(cv, None)
        first = self.order[0] == "x"
        return tuple(torch.cat([a, b] if first else [b, a], dim=2) for a, b in ((q, cq), (k, ck), (v, cv)))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, extra: dict):
        """The original's rotary embedding on q (and k), from the tables the region carries."""
        if self.rope is None or "q_cos" not in extra:
            return q, k
        style, layout, rot_dim = self.rope["style"], self.rope["layout"], self.rope.get("rot_dim")
        q = apply_rope(q, extra["q_cos"], extra["q_sin"], style, layout, rot_dim)
        if self.rope.get("k", True) and "k_cos" in extra:
            k = apply_rope(k, extra["k_cos"], extra["k_sin"], style, layout, rot_dim)
        return q, k

    def attend(self, q, k, v, extra: dict, segments=None):
        """The core over (B, H, L, Dh): ``joint_kernel`` over a joint sequence, else ``kernel``.
        Operators that take masks or biases override this to use ``extra``."""
        if segments is not None:
            return self.joint_kernel(q, k, v, segments)
        return self.kernel(q, k, v)

    def joint_kernel(self, q, k, v, segments):
        """The core over a joint sequence; ``segments``: ((name, tokens), ...) in sequence order,
        name "x" for the token (image) stream. Default: ``kernel`` over the whole sequence."""
        return self.kernel(q, k, v)

    def merge(self, o: torch.Tensor, like: torch.Tensor, proj: nn.Module | None = None) -> torch.Tensor:
        B, H, L, Dh = o.shape
        y = o.to(self._dtype).transpose(1, 2).reshape(B, L, H * Dh)
        proj = self.proj if proj is None else proj
        if proj is not None:
            y = proj(y)
        return y.to(like.dtype)                                           # (B, L, out)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, **extra):
        q, k, v = self.project(x, context)                                # (B, H, L, Dh)
        q, k = self.rotate(q, k, extra)
        if not self.joint:
            return self.merge(self.attend(q, k, v, extra), x)             # (B, L, out)
        sizes = {"x": x.shape[1], "context": context.shape[1]}
        segments = tuple((name, sizes[name]) for name in self.order)
        o = self.attend(q, k, v, extra, segments)
        parts = dict(zip(self.order, o.split([n for _, n in segments], dim=2)))
        out = self.merge(parts["x"], x)
        if self.context_proj is None:
            return out
        return out, self.merge(parts["context"], context, self.context_proj)

    def projection_flops(self, tokens: int, context_tokens: int | None = None) -> int:
        d = self.width
        out = self.proj.out_features if self.proj is not None else 0
        if self.cross:
            s = context_tokens or tokens
            return 2 * tokens * d * d + 2 * s * self.kv.in_features * 2 * d + 2 * tokens * d * out
        flops = 2 * tokens * d * 3 * d + 2 * tokens * d * out
        if self.joint and context_tokens:
            c = self.context_qkv.in_features
            flops += 2 * context_tokens * c * 3 * d + (2 * context_tokens * d * c if self.context_proj is not None else 0)
        return flops

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.config).items())
        return f"heads={self.heads}, head_dim={self.head_dim}, {fields}"


def rotate_half(t: torch.Tensor, style: str) -> torch.Tensor:
    """The rotation a rotary embedding multiplies by sin: "half" (Llama's rotate_half: the two
    halves of the head dim) or "interleaved" (pairs of neighbouring channels, diffusers' default)."""
    if style == "half":
        a, b = t.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)
    pairs = t.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, layout: str,
               rot_dim: int | None = None) -> torch.Tensor:
    """``t*cos + rot(t)*sin`` on t (B, H, L, Dh), with tables that broadcast against the
    original's layout there ("BHLD" or "BLHD"), computed in fp32 as the originals do; with
    ``rot_dim``, on the first rot_dim channels of each head only (the rest pass unchanged)."""
    if rot_dim is not None and rot_dim < t.shape[-1]:
        head, tail = t[..., :rot_dim], t[..., rot_dim:]
        return torch.cat([apply_rope(head, cos, sin, style, layout), tail], dim=-1)
    if layout == "BLHD":
        t = t.transpose(1, 2)
    out = (t.float() * cos + rotate_half(t, style).float() * sin).to(t.dtype)
    return out.transpose(1, 2) if layout == "BLHD" else out


def score_bias(steps, extra: dict, shape, rank: int = 4, dtype=torch.float32, device=None) -> torch.Tensor:
    """The additive terms between the scores and the softmax as one (B, H, L, S) tensor: the
    original's steps (add a term, fill where a mask says, view) replayed on zeros laid out as the original's scores
    (``rank`` 3: heads folded into the batch, (B*H, L, S))."""
    B, H, L, S = shape
    out = torch.zeros((B * H, L, S) if rank == 3 else (B, H, L, S), dtype=dtype, device=device)
    for kind, item, *fill in steps:
        if kind == "view":
            out = out.view(item)
        elif kind == "fill":            # scores.masked_fill(cond, value): cond True is hidden
            out = out.masked_fill(extra[item].bool(), fill[0])
        elif kind == "keep":            # torch.where(cond, scores, value): cond True is kept
            out = out.masked_fill(~extra[item].bool(), fill[0])
        else:
            out = out + extra[item]
    return out.reshape(B, H, L, S)


def attention_mask(q: torch.Tensor, k: torch.Tensor, extra: dict, *, causal: bool = False,
                   bias_steps=None, scores_rank: int = 4):
    """One SDPA ``attn_mask`` from what a region carries: its mask (bool: True attends, or
    additive), its additive bias terms and causality; None when there is nothing to apply."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    out = None
    terms = [step[1] for step in (bias_steps or ()) if step[0] in ("add", "fill", "keep")]
    if terms and all(name in extra for name in terms):
        out = score_bias(bias_steps, extra, (B, H, L, S), scores_rank, q.dtype, q.device)
    mask = extra.get("mask")
    if mask is not None:
        if mask.dtype == torch.bool:
            out = mask if out is None else out.masked_fill(~mask, float("-inf"))
        else:
            out = mask.to(q.dtype) if out is None else out + mask
    if causal and out is not None:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        out = (out & keep) if out.dtype == torch.bool else out.masked_fill(~keep, float("-inf"))
    return out
