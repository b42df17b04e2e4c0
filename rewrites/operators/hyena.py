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

Parameter names follow the paper's release (``in_proj``, ``short_filter``, ``inner_filter``,
``out_proj``; filters stored as Conv1d weights (C, 1, K)), so its grafted checkpoints load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from graftfx.kernels.hyena import (BACKENDS, MAX_TAPS, hyena_se_gate, hyena_x_gate, hyena_y_gate,
                                   short_conv)
from graftfx.rewrites.registry import register_operator


def _check_taps(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TAPS:
        raise ValueError(f"{name} must be an integer from 1 to {MAX_TAPS}, got {value!r}")


def _check_backend(backend, conv_len: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"conv_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "causal_conv1d" and not 2 <= conv_len <= 4:
        raise ValueError(f"conv_backend='causal_conv1d' takes conv_len 2 to 4, got {conv_len}; "
                         f"use conv_backend='graftfx'")


@dataclass
class HyenaXConfig:
    conv_len: int = 4              # featurizer short-conv taps
    conv_backend: str = "graftfx"  # "graftfx" (fused Triton conv + gate) or "causal_conv1d"

    def __post_init__(self):
        _check_taps("conv_len", self.conv_len)
        _check_backend(self.conv_backend, self.conv_len)


@dataclass
class HyenaYConfig:
    inner_len: int = 4             # inner filter h taps

    def __post_init__(self):
        _check_taps("inner_len", self.inner_len)


@dataclass
class HyenaSEConfig:
    conv_len: int = 4              # featurizer short-conv taps
    inner_len: int = 4             # inner filter h taps
    conv_backend: str = "graftfx"  # featurizer conv: "graftfx" (Triton) or "causal_conv1d"

    def __post_init__(self):
        _check_taps("conv_len", self.conv_len)
        _check_taps("inner_len", self.inner_len)
        _check_backend(self.conv_backend, self.conv_len)


@dataclass
class Hyena2DConfig:
    kernel_size: int = 3           # odd; the featurizer sees kernel_size x kernel_size tokens

    def __post_init__(self):
        if (isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int)
                or self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")


def _depthwise_conv1d(channels: int, taps: int) -> nn.Conv1d:
    """Holds a depthwise filter as the release stores it (weight (C, 1, K), bias (C,))."""
    return nn.Conv1d(channels, channels, taps, groups=channels, padding=taps - 1)


@torch.no_grad()
def _identity_(conv: nn.Conv1d) -> None:
    conv.weight.zero_()
    conv.weight[:, 0, -1] = 1.0
    conv.bias.zero_()


class _Hyena(nn.Module):
    """in_proj -> gate(u) -> out_proj. Subclasses set ``config_cls`` and define ``gate(u)``
    ((B, L, 3d) -> (B, L, d)) and ``conv_flops(tokens)``."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, out_dim or dim)

    @classmethod
    def from_region(cls, region, **options):
        return cls(region.width, cls.config_cls(**options), grid=region.grid,
                   out_dim=region.out_width or None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, L, D) -> (B, L, out_dim)
        if x.dim() != 3 or x.shape[-1] != self.in_proj.in_features:
            raise ValueError(f"{self.operator_name} expects x of shape (batch, tokens, "
                             f"{self.in_proj.in_features}), got {tuple(x.shape)}")
        u = self.in_proj(x.to(self.in_proj.weight.dtype))
        return self.out_proj(self.gate(u)).to(x.dtype)

    def flops(self, tokens: int) -> int:
        """Matmul-class FLOPs per sample: projections and convs (2 per multiply-add); the
        elementwise gating products are not counted."""
        d = self.in_proj.in_features
        projections = 2 * tokens * d * (3 * d) + 2 * tokens * d * self.out_proj.out_features
        return projections + self.conv_flops(tokens)


@register_operator("hyena_x", config=HyenaXConfig, kinds=("self_attention",), loss="l1",
                   description="Hyena-X: causal short conv featurizer over q, k, v; y = q*(k*v)")
class HyenaX(_Hyena):
    config_cls = HyenaXConfig

    def __init__(self, dim: int, config: HyenaXConfig | None = None, grid=None, *,
                 out_dim: int | None = None):
        super().__init__(dim, out_dim)
        self.config, self.grid = config or HyenaXConfig(), grid
        self.short_filter = _depthwise_conv1d(3 * dim, self.config.conv_len)

    def gate(self, u):
        weight, bias = self.short_filter.weight.squeeze(1), self.short_filter.bias
        if self.config.conv_backend == "causal_conv1d":   # the package's conv, then the gate
            q, k, v = short_conv(u, weight, bias, backend="causal_conv1d").chunk(3, dim=-1)
            return q * (k * v)
        return hyena_x_gate(u, weight, bias)

    def conv_flops(self, tokens):
        return 2 * tokens * self.short_filter.in_channels * self.config.conv_len

    def extra_repr(self) -> str:
        return f"conv_len={self.config.conv_len}, conv_backend={self.config.conv_backend!r}"


@register_operator("hyena_y", config=HyenaYConfig, kinds=("self_attention",), loss="l1",
                   description="Hyena-Y: y = q*h(k*v), h a causal short conv (identity at init)")
class HyenaY(_Hyena):
    config_cls = HyenaYConfig

    def __init__(self, dim: int, config: HyenaYConfig | None = None, grid=None, *,
                 out_dim: int | None = None):
        super().__init__(dim, out_dim)
        self.config, self.grid = config or HyenaYConfig(), grid
        self.inner_filter = _depthwise_conv1d(dim, self.config.inner_len)
        _identity_(self.inner_filter)

    def gate(self, u):
        return hyena_y_gate(u, self.inner_filter.weight.squeeze(1), self.inner_filter.bias)

    def conv_flops(self, tokens):
        return 2 * tokens * self.inner_filter.in_channels * self.config.inner_len

    def extra_repr(self) -> str:
        return f"inner_len={self.config.inner_len}"


@register_operator("hyena_se", config=HyenaSEConfig, kinds=("self_attention",), loss="l1",
                   description="Hyena-SE: short conv featurizer, then y = q*h(k*v)")
class HyenaSE(_Hyena):
    config_cls = HyenaSEConfig

    def __init__(self, dim: int, config: HyenaSEConfig | None = None, grid=None, *,
                 out_dim: int | None = None):
        super().__init__(dim, out_dim)
        self.config, self.grid = config or HyenaSEConfig(), grid
        self.short_filter = _depthwise_conv1d(3 * dim, self.config.conv_len)
        self.inner_filter = _depthwise_conv1d(dim, self.config.inner_len)
        _identity_(self.inner_filter)

    def gate(self, u):
        return hyena_se_gate(u, self.short_filter.weight.squeeze(1), self.short_filter.bias,
                             self.inner_filter.weight.squeeze(1), self.inner_filter.bias,
                             backend=self.config.conv_backend)

    def conv_flops(self, tokens):
        return 2 * tokens * (self.short_filter.in_channels * self.config.conv_len
                             + self.inner_filter.in_channels * self.config.inner_len)

    def extra_repr(self) -> str:
        return (f"conv_len={self.config.conv_len}, inner_len={self.config.inner_len}, "
                f"conv_backend={self.config.conv_backend!r}")


def _square_grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"hyena_x2d needs the token grid: {tokens} tokens is not a square and "
                         f"the region has no grid; match a region that records its (H, W) grid")
    return side, side


@register_operator("hyena_x2d", config=Hyena2DConfig, kinds=("self_attention",), loss="l1",
                   description="Hyena-X with a k x k depthwise conv featurizer on the token grid")
class HyenaX2D(_Hyena):
    config_cls = Hyena2DConfig

    def __init__(self, dim: int, config: Hyena2DConfig | None = None, grid=None, *,
                 out_dim: int | None = None):
        super().__init__(dim, out_dim)
        self.config = config or Hyena2DConfig()
        self.grid = tuple(grid) if grid is not None else None
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ValueError(f"grid must be (H, W) with H, W >= 1, got {grid!r}")
        ks = self.config.kernel_size
        self.short_filter = nn.Conv2d(3 * dim, 3 * dim, ks, padding=ks // 2, groups=3 * dim)

    @classmethod
    def from_region(cls, region, **options):
        grid = region.grid
        if grid is None and region.tokens is not None:
            grid = _square_grid(region.tokens)
        return cls(region.width, Hyena2DConfig(**options), grid=grid,
                   out_dim=region.out_width or None)

    def _grid(self, tokens: int) -> tuple[int, int]:
        if self.grid is None:
            return _square_grid(tokens)
        if self.grid[0] * self.grid[1] != tokens:
            raise ValueError(f"hyena_x2d was built for a {self.grid[0]}x{self.grid[1]} token "
                             f"grid but got {tokens} tokens; rebuild it for this resolution")
        return self.grid

    def gate(self, u):
        batch, tokens, channels = u.shape
        height, width = self._grid(tokens)
        img = u.transpose(1, 2).reshape(batch, channels, height, width)
        feats = self.short_filter(img).reshape(batch, channels, tokens).transpose(1, 2)
        q, k, v = feats.chunk(3, dim=-1)
        return q * (k * v)

    def conv_flops(self, tokens):
        return 2 * tokens * self.short_filter.in_channels * self.config.kernel_size ** 2

    def extra_repr(self) -> str:
        return f"kernel_size={self.config.kernel_size}, grid={self.grid}"
