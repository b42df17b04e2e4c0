"""Multi-head attention: the self-grafting baseline (self- or cross-attention).

``init="copy"`` takes the original projections, q/k norms and softmax scale (already in head
order in ``Region.weights``), so the graft reproduces the original exactly; ``init="fresh"``
starts from random weights. The core is ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graftfx.operator import AttentionConfig, AttentionOperator
from graftfx.registry import register_operator


@dataclass
class MHAConfig(AttentionConfig):
    pass


@register_operator("mha", config=MHAConfig, kinds=("self_attention", "cross_attention"), loss="l1",
                   description="multi-head attention (self-grafting baseline), copied or fresh")
class MHA(AttentionOperator):
    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)    # (B, H, L, Dh)

    def flops(self, tokens: int, context_tokens: int | None = None) -> int:
        s = context_tokens or tokens
        return self.projection_flops(tokens, context_tokens) + 4 * tokens * s * self.width
