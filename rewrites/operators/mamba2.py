"""Mamba-2 (SSD) as a self-attention replacement: one causal scan over the raster-order tokens
(the paper's config: d_state 64, d_conv 4, expand 2, headdim 16, one direction). It takes no
rotary embedding, mask or bias of a region.

    in_proj: d -> [z (d_inner) | x (d_inner) | B (G*N) | C (G*N) | dt (nheads)]
    x|B|C   -> causal depthwise conv1d (length d_conv) + SiLU
    dt      =  softplus(dt + dt_bias);  A = -exp(A_log)
    y       =  SSD scan (h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t) + D x
    y       =  RMSNorm(y * silu(z)) * weight   (per group of d_inner / G channels)
    out_proj: d_inner -> out_width

with d_inner = expand * d, nheads = d_inner / headdim, G = ngroups, N = d_state. Parameter
names and layouts follow ``mamba_ssm.modules.mamba2.Mamba2`` (in_proj, conv1d, dt_bias, A_log,
D, norm.weight, out_proj; rmsnorm, norm_before_gate=False, no linear biases), so a state dict
moves between the two. Backends of the scan: ``"triton"`` (``graftfx.kernels.mamba2``:
Triton on CUDA, the chunked PyTorch reference elsewhere), ``"reference"`` (the chunked
PyTorch reference, fp32, always), ``"mamba_ssm"`` (mamba_ssm's ``mamba_chunk_scan_combined``,
the SSD kernel its Mamba2 module runs; used on CUDA when mamba_ssm is installed, else the
``"triton"`` path with a warning).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from graftfx.kernels._dispatch import optional_backend
from graftfx.kernels.mamba2 import ssd_chunked, ssd_scan
from graftfx.operator import Backend, Operator
from graftfx.options import check_choice, check_int, check_number
from graftfx.registry import register_operator

BACKENDS = ("triton", "mamba_ssm", "reference")
MAX_D_STATE = 256
MAX_HEADDIM = 256


@dataclass
class Mamba2Config:
    d_state: int = 64          # N, the state size per head
    d_conv: int = 4            # causal depthwise conv length over x|B|C
    expand: int = 2            # d_inner = expand * width
    headdim: int = 16          # P; nheads = d_inner / headdim
    ngroups: int = 1           # B/C groups shared by nheads / ngroups heads each
    chunk_size: int = 64       # SSD chunk length (power of two, 16..256)
    dt_min: float = 1e-3       # dt initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 1e-1
    backend: str = "triton"    # "triton", "mamba_ssm" or "reference"

    def __post_init__(self):
        check_int("d_state", self.d_state, 1, MAX_D_STATE)
        check_int("headdim", self.headdim, 1, MAX_HEADDIM)
        for name in ("d_conv", "expand", "ngroups"):
            check_int(name, getattr(self, name), 1)
        check_int("chunk_size", self.chunk_size, 16, 256)
        if self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two in 16..256, got {self.chunk_size}")
        check_number("dt_min", self.dt_min, positive=True)
        check_number("dt_max", self.dt_max, positive=True)
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, "
                             f"got dt_min={self.dt_min!r}, dt_max={self.dt_max!r}")
        check_choice("backend", self.backend, BACKENDS)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * weight, normalised over groups of ``group_size`` channels."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight.float()).to(y.dtype)


def _mamba_ssm_scan():
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return mamba_chunk_scan_combined


@register_operator("mamba2", config=Mamba2Config, kinds=("self_attention",), loss="l1",
                   description="Mamba-2 SSD scan over raster-order tokens "
                               "(paper: d_state 64, d_conv 4, expand 2, headdim 16)")
class Mamba2(Operator):
    backends = (Backend("mamba_ssm", {"backend": "mamba_ssm"}),)

    def __init__(self, dim: int, config: Mamba2Config, grid=None, *, out_dim: int | None = None):
        super().__init__()
        c = config
        self.config, self.grid, self.dim = c, grid, dim
        self.d_inner = c.expand * dim
        if self.d_inner % c.headdim:
            raise ValueError(f"headdim={c.headdim} must divide expand * width = {self.d_inner}; "
                             f"set headdim to a divisor of {self.d_inner}")
        self.nheads = self.d_inner // c.headdim
        if self.nheads % c.ngroups:
            raise ValueError(f"ngroups={c.ngroups} must divide the number of heads {self.nheads} "
                             f"(expand * width / headdim)")
        self.conv_dim = self.d_inner + 2 * c.ngroups * c.d_state

        self.in_proj = nn.Linear(dim, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.d_conv, groups=self.conv_dim,
                                padding=c.d_conv - 1)
        # dt log-uniform in [dt_min, dt_max]; dt_bias = softplus^-1(dt)
        dt = torch.exp(torch.rand(self.nheads) * (math.log(c.dt_max) - math.log(c.dt_min))
                       + math.log(c.dt_min)).clamp_min(min(1e-4, c.dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // c.ngroups)
        self.out_proj = nn.Linear(self.d_inner, out_dim or dim, bias=False)

        if c.backend == "mamba_ssm" and not optional_backend("mamba_ssm"):
            warnings.warn("mamba2: backend='mamba_ssm' but mamba_ssm is not installed; "
                          "using graftfx's Triton kernel", stacklevel=2)

    @classmethod
    def from_region(cls, region, config):
        return cls(region.width, config, grid=region.grid, out_dim=region.out_width or None)

    def kernel(self, x, dt, A, B, C):
        """The SSD scan y (batch, L, nheads, headdim) on the configured backend."""
        c = self.config
        if c.backend == "reference":
            return self.kernel_reference(x, dt, A, B, C)
        if c.backend == "mamba_ssm" and x.is_cuda and optional_backend("mamba_ssm"):
            return _mamba_ssm_scan()(x, dt, A, B, C, c.chunk_size, D=self.D)
        return ssd_scan(x, dt.to(torch.float32), A, B, C, self.D, c.chunk_size)

    def kernel_reference(self, x, dt, A, B, C):
        return ssd_chunked(x, dt, A, B, C, self.D, self.config.chunk_size).to(x.dtype)

    def forward(self, u: torch.Tensor) -> torch.Tensor:     # (batch, L, D) -> (batch, L, out)
        batch, L, _ = u.shape
        c = self.config
        zxbcdt = self.in_proj(u.to(self.in_proj.weight.dtype))
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :L].transpose(1, 2))
        x, B, C = xbc.split([self.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        y = self.kernel(x.reshape(batch, L, self.nheads, c.headdim), dt, A,
                       B.reshape(batch, L, c.ngroups, c.d_state),
                       C.reshape(batch, L, c.ngroups, c.d_state))
        y = self.norm(y.reshape(batch, L, self.d_inner), z)
        return self.out_proj(y).to(u.dtype)

    def flops(self, tokens: int) -> int:
        """Matmul-class FLOPs per sample: projections, the conv, and the chunked scan's
        products (C B^T per group, the masked product with x, chunk states, state read-out)."""
        c, L = self.config, tokens
        q = min(c.chunk_size, L)
        proj = 2 * L * (self.dim * self.in_proj.out_features
                        + self.d_inner * self.out_proj.out_features)
        conv = 2 * L * self.conv_dim * c.d_conv
        scan = (2 * L * q * c.d_state * c.ngroups                     # C B^T within chunks
                + 2 * L * q * self.d_inner                            # masked (C B^T) x
                + 2 * 2 * L * c.d_state * self.d_inner)               # chunk states + read-out
        return proj + conv + scan

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_inner={self.d_inner}, nheads={self.nheads}, d_state={c.d_state}, "
                f"ngroups={c.ngroups}, chunk_size={c.chunk_size}, backend={c.backend!r}")
