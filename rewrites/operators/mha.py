"""Multi-head attention: the self-grafting baseline, for every attention kind (self, causal
self, cross, joint over two streams).

``init="copy"`` takes the original projections, q/k norms and softmax scale (already in head
order in ``Region.weights``), so the graft reproduces the original exactly; ``init="fresh"``
starts from random weights. The core is ``F.scaled_dot_product_attention``. It takes everything
a region carries: the rotary embedding (applied by the attention base), a key-padding mask,
additive biases (relative-position bias, shifted-window masks) and causality.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graftfx.operator import AttentionConfig, AttentionOperator, attention_mask
from graftfx.registry import register_operator


@dataclass
class MHAConfig(AttentionConfig):
    pass


@register_operator("mha", config=MHAConfig,
                   kinds=("self_attention", "causal_self_attention", "cross_attention", "joint_attention"),
                   loss="l1", description="multi-head attention (self-grafting baseline), copied or fresh")
class MHA(AttentionOperator):
    takes = frozenset({"rope", "mask", "bias"})

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None,
               is_causal: bool = False) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=self.scale)                 # (B, H, L, Dh)

    def attend(self, q, k, v, extra, segments=None):
        mask = attention_mask(q, k, extra, causal=self.causal, bias_steps=self.bias_steps,
                              scores_rank=self.scores_rank)
        return self.kernel(q, k, v, mask, self.causal and mask is None)

    def flops(self, tokens: int, context_tokens: int | None = None) -> int:
        s = context_tokens or tokens
        return self.projection_flops(tokens, context_tokens) + 4 * tokens * s * self.width
