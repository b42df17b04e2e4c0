"""MLP Hyena-X (the paper's convolutional MLP replacement, expansion ratio r = 2).

``x`` (B, L, d) -> ``in_proj: d -> 3*(r*d)`` -> a causal short conv along the FEATURE axis with
one (K,) filter per token position (weights (L, K), bias (L,)) over the concatenated 3*r*d
features -> split into q, k, v -> ``q * (k * v)`` -> ``out_proj: r*d -> out_width``.

The filters are per token, so the operator is built for the region's token count L; the batch
may vary. The conv + gate run fused in ``graftfx.kernels.hyena.mlp_hyena_x_gate``. Parameter
names follow the paper's release (``in_proj``, ``short_filter`` as a Conv1d over L channels,
``out_proj``), so its grafted checkpoints load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from graftfx.kernels.hyena import MAX_TAPS, mlp_hyena_x_gate, naive
from graftfx.operator import Operator
from graftfx.options import check_int
from graftfx.registry import register_operator


@dataclass
class MLPHyenaXConfig:
    ratio: int = 2                 # hidden width r*d (r = 2 matches the original MLP's FLOPs)
    conv_len: int = 4              # feature-axis filter taps

    def __post_init__(self):
        check_int("ratio", self.ratio, 1)
        check_int("conv_len", self.conv_len, 1, MAX_TAPS)


@register_operator("mlp_hyena_x", config=MLPHyenaXConfig, kinds=("mlp",), loss="l2",
                   description="MLP Hyena-X: per-token causal conv along features, q*(k*v), r=2")
class MLPHyenaX(Operator):
    def __init__(self, dim: int, tokens: int, config: MLPHyenaXConfig, *, out_dim: int | None = None):
        super().__init__()
        self.config = config
        check_int("width", dim, 1)
        check_int("tokens", tokens, 1)
        self.tokens = tokens
        self.hidden = self.config.ratio * dim
        taps = self.config.conv_len
        if self.hidden < taps:
            raise ValueError(f"conv_len={taps} is longer than the hidden width {self.hidden}; "
                             f"lower conv_len or raise ratio")
        self.in_proj = nn.Linear(dim, 3 * self.hidden)
        self.short_filter = nn.Conv1d(tokens, tokens, taps, groups=tokens, padding=taps - 1)
        self.out_proj = nn.Linear(self.hidden, out_dim or dim)

    @classmethod
    def from_region(cls, region, config):
        if not region.tokens:
            raise ValueError(f"mlp_hyena_x has one filter per token and needs the token count of "
                             f"{region.path}, which the match did not record; trace the model "
                             f"with example inputs of the real resolution")
        return cls(region.width, region.tokens, config, out_dim=region.out_width or None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, L, D) -> (B, L, out_dim)
        if x.dim() != 3 or x.shape[1] != self.tokens or x.shape[2] != self.in_proj.in_features:
            raise ValueError(f"mlp_hyena_x was built for (batch, {self.tokens}, "
                             f"{self.in_proj.in_features}) inputs, got {tuple(x.shape)}; its "
                             f"filters are per token, so rebuild it for this resolution")
        u = self.in_proj(x.to(self.in_proj.weight.dtype))              # (B, L, 3 r D)
        return self.out_proj(self.kernel(u)).to(x.dtype)                # (B, L, out)

    def kernel(self, u):
        return mlp_hyena_x_gate(u, self.short_filter.weight.squeeze(1), self.short_filter.bias)

    def kernel_reference(self, u):
        return naive.mlp_hyena_x(u, self.short_filter.weight.squeeze(1), self.short_filter.bias).to(u.dtype)

    def flops(self, tokens: int) -> int:
        """Matmul-class FLOPs per sample: projections and the feature-axis conv (2 per
        multiply-add); the elementwise gating products are not counted."""
        d, h = self.in_proj.in_features, self.hidden
        projections = 2 * tokens * d * (3 * h) + 2 * tokens * h * self.out_proj.out_features
        return projections + 2 * tokens * (3 * h) * self.config.conv_len

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}, ratio={self.config.ratio}, conv_len={self.config.conv_len}"
