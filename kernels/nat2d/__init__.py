"""2D neighbourhood attention over a raster token grid: Triton kernels (``fused``) and the
dense masked fp32 reference (``naive``)."""
from .fused import (nat2d_bwd, nat2d_bwd_op, nat2d_fwd, nat2d_op,
                    neighborhood_attention_2d)
from .naive import nat2d_mask, naive_nat2d, naive_nat2d_bwd, window_start

__all__ = ["nat2d_bwd", "nat2d_bwd_op", "nat2d_fwd", "nat2d_mask", "nat2d_op", "naive_nat2d",
           "naive_nat2d_bwd", "neighborhood_attention_2d", "window_start"]
