"""Non-causal linear attention: ``linear_attention(q, k, v, feature_map="elu", eps=1e-6)``.

``naive.py`` is the fp32 PyTorch oracle; ``noncausal.py`` holds the Triton kernels, their
launchers and the ``graftfx::linear_attn`` custom op.
"""
from .naive import FEATURE_MAPS, linear_attn_bwd_ref, linear_attn_ref
from .noncausal import linear_attention, linear_attn_bwd, linear_attn_fwd, linear_attn_op

__all__ = ["FEATURE_MAPS", "linear_attention", "linear_attn_bwd", "linear_attn_bwd_ref",
           "linear_attn_fwd", "linear_attn_op", "linear_attn_ref"]
