"""Sliding-window attention (the paper's SWA): multi-head softmax attention in which token i
sees only tokens j with |i - j| <= window of the 1D raster sequence (flash-attn
``window_size=(window, window)``, non-causal; the paper uses window 4 and 16 heads).

q/k/v/out projections as every attention-family operator (``graftfx.operator``), the core
``graftfx.kernels.swa.sliding_window_attention`` (reference: ``naive_swa``). ``init="copy"``
starts from the original attention's projections, so with a window >= L the operator *is* the
original attention; ``init="fresh"`` is random.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from graftfx.kernels.swa import BACKENDS, flash_attn_available, naive_swa, sliding_window_attention
from graftfx.operator import AttentionConfig, AttentionOperator, Backend
from graftfx.options import check_choice, check_int
from graftfx.registry import register_operator


@dataclass
class SWAConfig(AttentionConfig):
    window: int = 4                # token i attends to j with |i - j| <= window
    backend: str = "triton"        # "triton" (graftfx kernel), "flash_attn", "reference"

    def __post_init__(self):
        super().__post_init__()
        check_int("window", self.window, 0)
        check_choice("backend", self.backend, BACKENDS)


def window_pairs(tokens: int, window: int) -> int:
    """Number of (query, key) pairs with |i - j| <= window among ``tokens`` positions."""
    if window >= tokens - 1:
        return tokens * tokens
    return tokens * (2 * window + 1) - window * (window + 1)


@register_operator("swa", config=SWAConfig, kinds=("self_attention",), loss="l1",
                   description="sliding-window attention, |i - j| <= window (paper: 4), multi-head")
class SlidingWindowAttention(AttentionOperator):
    backends = (Backend("flash_attn", {"backend": "flash_attn"}, (torch.float16, torch.bfloat16)),)

    def __init__(self, width: int, config: SWAConfig, **kw):
        super().__init__(width, config, **kw)
        if config.backend == "flash_attn" and not flash_attn_available():
            warnings.warn("swa: backend='flash_attn' but flash_attn is not installed; "
                          "using graftfx's Triton kernel", stacklevel=3)

    def _backend(self, q: torch.Tensor) -> str:
        # flash_attn only where it runs (CUDA, half precision); elsewhere graftfx's kernel.
        runs = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
        if self.config.backend == "flash_attn" and not runs:
            return "triton"
        return self.config.backend

    def kernel(self, q, k, v):
        return sliding_window_attention(q, k, v, self.config.window, scale=self.scale,
                                        backend=self._backend(q))

    def kernel_reference(self, q, k, v):
        return naive_swa(q, k, v, self.config.window, self.scale)[0].to(q.dtype)

    def flops(self, tokens: int) -> int:
        # QK^T and PV over the pairs inside the window, all heads: 2 * 2 * pairs * d
        return self.projection_flops(tokens) + 4 * window_pairs(tokens, self.config.window) * self.width
