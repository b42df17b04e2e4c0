"""Hyena-family attention replacements: gated short convolutions over the token sequence.

All take the attention's input (after norm + modulation) ``x`` (B, L, d), project it with
``in_proj: d -> 3d`` into q, k, v (channel thirds), gate, and project back with
``out_proj: d -> out_width``. Convolutions run along the raster token order, causally (the
paper's convention), depthwise, with ``torch.nn.Conv1d`` tap order (last tap = current token):

- ``hyena_x``: featurizer short conv over all 3d channels, ``y = q * (k * v)``
  (``graftfx.kernels.hyena.hyena_x_gate``: conv + gate fused in one Triton pass).
- ``hyena_y``: no featurizer, ``y = q * h(k * v)``, h a short conv over d channels initialised
  to the identity (last tap 1, bias 0), so at init Hyena-Y is ``q * (k * v)``
  (``hyena_y_gate``).
- ``hyena_se``: featurizer conv and inner conv h (``short_conv`` then ``hyena_y_gate``).
- ``hyena_x2d`` (not in the paper): Hyena-X whose featurizer is a non-causal k x k depthwise
  conv over the (H, W) token grid (plain ``F.conv2d``).

Hyena-X/Y/SE are causal by construction, so they also replace causal self-attention (an LLM's).
None of them takes a region's rotary embedding, mask or bias (``takes`` is empty): a key-padded
region is refused, and positions come from the convolutions themselves.

Parameter names follow the paper's release (``in_proj``, ``short_filter``, ``inner_filter``,
``out_proj``; filters stored as Conv1d weights (C, 1, K)), so its grafted checkpoints load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from graftfx.kernels.hyena import (BACKENDS, MAX_TAPS, hyena_se_gate, hyena_x_gate, hyena_y_gate, naive,
                                   short_conv)
from graftfx.match.grid import region_token_grid, token_grid
from graftfx.operator import Backend, Operator
from graftfx.options import check_choice, check_int
from graftfx.registry import register_operator


CAUSAL_OK = ("self_attention", "causal_self_attention")   # a causal conv never looks ahead


def _check_backend(backend, conv_len: int) -> None:
    check_choice("conv_backend", backend, BACKENDS)
    if backend == "causal_conv1d" and not 2 <= conv_len <= 4:
        raise ValueError(f"conv_backend='causal_conv1d' takes conv_len 2 to 4, got {conv_len}; "
                         f"use conv_backend='graftfx'")


@dataclass
class HyenaXConfig:
    conv_len: int = 4              # featurizer short-conv taps
    conv_backend: str = "graftfx"  # "graftfx" (fused Triton conv + gate) or "causal_conv1d"

    def __post_init__(self):
        check_int("conv_len", self.conv_len, 1, MAX_TAPS)
        _check_backend(self.conv_backend, self.conv_len)


@dataclass
class HyenaYConfig:
    inner_len: int = 4             # inner filter h taps

    def __post_init__(self):
        check_int("inner_len", self.inner_len, 1, MAX_TAPS)


@dataclass
class HyenaSEConfig:
    conv_len: int = 4              # featurizer short-conv taps
    inner_len: int = 4             # inner filter h taps
    conv_backend: str = "graftfx"  # featurizer conv: "graftfx" (Triton) or "causal_conv1d"

    def __post_init__(self):
        check_int("conv_len", self.conv_len, 1, MAX_TAPS)
        check_int("inner_len", self.inner_len, 1, MAX_TAPS)
        _check_backend(self.conv_backend, self.conv_len)


@dataclass
class Hyena2DConfig:
    kernel_size: int = 3           # odd; the featurizer sees kernel_size x kernel_size tokens

    def __post_init__(self):
        check_int("kernel_size", self.kernel_size, 1, odd=True)


def _depthwise_conv1d(channels: int, taps: int) -> nn.Conv1d:
    """Holds a depthwise filter as the release stores it (weight (C, 1, K), bias (C,))."""
    return nn.Conv1d(channels, channels, taps, groups=channels, padding=taps - 1)


def _taps(conv: nn.Conv1d) -> tuple[torch.Tensor, torch.Tensor]:
    return conv.weight.squeeze(1), conv.bias                    # (C, K), (C,)


@torch.no_grad()
def _identity_(conv: nn.Conv1d) -> None:
    conv.weight.zero_()
    conv.weight[:, 0, -1] = 1.0
    conv.bias.zero_()


class _Hyena(Operator):
    """in_proj -> ``kernel(u)`` ((B, L, 3d) -> (B, L, d)) -> out_proj."""

    def __init__(self, dim: int, config, *, out_dim: int | None = None, grid=None):
        super().__init__()
        check_int("width", dim, 1)
        self.config, self.grid = config, tuple(grid) if grid is not None else None
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, out_dim or dim)

    @classmethod
    def from_region(cls, region, config):
        return cls(region.width, config, out_dim=region.out_width or None, grid=region.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, L, D) -> (B, L, out_dim)
        if x.dim() != 3 or x.shape[-1] != self.in_proj.in_features:
            raise ValueError(f"{self.operator_name} expects x of shape (batch, tokens, "
                             f"{self.in_proj.in_features}), got {tuple(x.shape)}")
        u = self.in_proj(x.to(self.in_proj.weight.dtype))               # (B, L, 3D)
        return self.out_proj(self.kernel(u)).to(x.dtype)

    def flops(self, tokens: int) -> int:
        """Matmul-class FLOPs per sample: projections and convs (2 per multiply-add); the
        elementwise gating products are not counted."""
        d = self.in_proj.in_features
        projections = 2 * tokens * d * (3 * d) + 2 * tokens * d * self.out_proj.out_features
        return projections + self.conv_flops(tokens)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())


causal_conv1d = Backend("causal_conv1d", {"conv_backend": "causal_conv1d"})


@register_operator("hyena_x", config=HyenaXConfig, kinds=CAUSAL_OK, loss="l1",
                   description="Hyena-X: causal short conv featurizer over q, k, v; y = q*(k*v)")
class HyenaX(_Hyena):
    backends = (causal_conv1d,)

    def __init__(self, dim: int, config: HyenaXConfig, **kw):
        super().__init__(dim, config, **kw)
        self.short_filter = _depthwise_conv1d(3 * dim, config.conv_len)

    def kernel(self, u):
        if self.config.conv_backend == "causal_conv1d":   # the package's conv, then the gate
            q, k, v = short_conv(u, *_taps(self.short_filter), backend="causal_conv1d").chunk(3, dim=-1)
            return q * (k * v)
        return hyena_x_gate(u, *_taps(self.short_filter))

    def kernel_reference(self, u):
        return naive.hyena_x(u, *_taps(self.short_filter)).to(u.dtype)

    def conv_flops(self, tokens):
        return 2 * tokens * self.short_filter.in_channels * self.config.conv_len


@register_operator("hyena_y", config=HyenaYConfig, kinds=CAUSAL_OK, loss="l1",
                   description="Hyena-Y: y = q*h(k*v), h a causal short conv (identity at init)")
class HyenaY(_Hyena):
    def __init__(self, dim: int, config: HyenaYConfig, **kw):
        super().__init__(dim, config, **kw)
        self.inner_filter = _depthwise_conv1d(dim, config.inner_len)
        _identity_(self.inner_filter)

    def kernel(self, u):
        return hyena_y_gate(u, *_taps(self.inner_filter))

    def kernel_reference(self, u):
        return naive.hyena_y(u, *_taps(self.inner_filter)).to(u.dtype)

    def conv_flops(self, tokens):
        return 2 * tokens * self.inner_filter.in_channels * self.config.inner_len


@register_operator("hyena_se", config=HyenaSEConfig, kinds=CAUSAL_OK, loss="l1",
                   description="Hyena-SE: short conv featurizer, then y = q*h(k*v)")
class HyenaSE(_Hyena):
    backends = (causal_conv1d,)

    def __init__(self, dim: int, config: HyenaSEConfig, **kw):
        super().__init__(dim, config, **kw)
        self.short_filter = _depthwise_conv1d(3 * dim, config.conv_len)
        self.inner_filter = _depthwise_conv1d(dim, config.inner_len)
        _identity_(self.inner_filter)

    def kernel(self, u):
        return hyena_se_gate(u, *_taps(self.short_filter), *_taps(self.inner_filter),
                             backend=self.config.conv_backend)

    def kernel_reference(self, u):
        return naive.hyena_se(u, *_taps(self.short_filter), *_taps(self.inner_filter)).to(u.dtype)

    def conv_flops(self, tokens):
        return 2 * tokens * (self.short_filter.in_channels * self.config.conv_len
                             + self.inner_filter.in_channels * self.config.inner_len)


@register_operator("hyena_x2d", config=Hyena2DConfig, kinds=("self_attention",), loss="l1",
                   description="Hyena-X with a k x k depthwise conv featurizer on the token grid")
class HyenaX2D(_Hyena):
    def __init__(self, dim: int, config: Hyena2DConfig, **kw):
        super().__init__(dim, config, **kw)
        ks = config.kernel_size
        self.short_filter = nn.Conv2d(3 * dim, 3 * dim, ks, padding=ks // 2, groups=3 * dim)

    @classmethod
    def from_region(cls, region, config):
        if region.tokens is not None:
            region_token_grid(region, who="hyena_x2d")   # fail at build time
        return super().from_region(region, config)

    def kernel(self, u):                                        # plain PyTorch: no reference
        batch, tokens, channels = u.shape
        height, width = token_grid(tokens, self.grid, who="hyena_x2d")
        img = u.transpose(1, 2).reshape(batch, channels, height, width)
        feats = self.short_filter(img).reshape(batch, channels, tokens).transpose(1, 2)
        q, k, v = feats.chunk(3, dim=-1)
        return q * (k * v)

    def conv_flops(self, tokens):
        return 2 * tokens * self.short_filter.in_channels * self.config.kernel_size ** 2
