"""Sliding-window attention: Triton flash-attention kernel with block skipping (``fused``)
and its dense fp32 reference (``naive``)."""
from .fused import (BACKENDS, flash_attn_available, sliding_window_attention, swa_bwd,
                    swa_bwd_op, swa_flash_attn, swa_fwd, swa_op)
from .naive import naive_swa, naive_swa_bwd, swa_mask

__all__ = ["BACKENDS", "flash_attn_available", "naive_swa", "naive_swa_bwd",
           "sliding_window_attention", "swa_bwd", "swa_bwd_op", "swa_flash_attn", "swa_fwd",
           "swa_mask", "swa_op"]
