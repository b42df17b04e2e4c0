"""Non-causal linear attention: softmax(q k^T) v replaced by a positive feature map,

    o_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)   per head,

O(L d Dh) instead of O(L^2 d). q/k/v/out projections as every attention-family operator
(``graftfx.operator``), the core ``graftfx.kernels.linear_attn.linear_attention`` (reference:
``linear_attn_ref``). ``init="copy"`` starts from the original attention's projections;
``init="fresh"`` is random. The softmax scale plays no part (phi is applied to q and k as is).
It applies the region's rotary embedding (the attention base does) and no mask or bias.
"""
from __future__ import annotations

from dataclasses import dataclass

from graftfx.kernels.linear_attn import FEATURE_MAPS, linear_attention, linear_attn_ref
from graftfx.kernels.linear_attn.noncausal import MAX_HEAD_DIM
from graftfx.operator import AttentionConfig, AttentionOperator
from graftfx.options import check_choice, check_number
from graftfx.registry import register_operator


@dataclass
class LinearAttentionConfig(AttentionConfig):
    feature_map: str = "elu"       # "elu" (elu + 1) or "relu"
    eps: float = 1e-6              # added to the normaliser phi(q) . sum phi(k)

    def __post_init__(self):
        super().__post_init__()
        check_choice("feature_map", self.feature_map, FEATURE_MAPS)
        check_number("eps", self.eps, positive=True)


@register_operator("linear_attention", config=LinearAttentionConfig, kinds=("self_attention",),
                   loss="l1", description="non-causal linear attention, phi = elu+1 or relu, O(L d Dh)")
class LinearAttention(AttentionOperator):
    max_head_dim = MAX_HEAD_DIM

    def kernel(self, q, k, v):
        return linear_attention(q, k, v, self.config.feature_map, self.config.eps)      # (B, H, L, Dh)

    def kernel_reference(self, q, k, v):
        return linear_attn_ref(q, k, v, self.config.feature_map, self.config.eps)

    def flops(self, tokens: int) -> int:
        # per head: state phi(K)^T V and outputs phi(Q) S (2 L Dh^2 each), normaliser (2 L Dh)
        return self.projection_flops(tokens) + 4 * tokens * self.width * self.head_dim + 2 * tokens * self.width
