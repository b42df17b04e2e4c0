"""Pieces the Hyena kernel files share: the Triton tile of a causal depthwise conv, tile sizes,
the dtype cast of reference gradients, and input checks with one-line messages.

Layout convention of every Hyena kernel: activations are ``(B, L, C)`` with the channel axis
contiguous; a depthwise filter is ``(C, K)`` in ``torch.nn.Conv1d`` tap order, so output row
``t`` is ``bias[c] + sum_j weight[c, j] * u[t - (K - 1) + j, c]`` with zeros before row 0
(``F.conv1d(padding=K-1)[..., :L]``): the last tap ``K - 1`` multiplies the current row. The
kernels read filters as ``(K, C)`` (``taps_major``: the launchers transpose the tiny filter
tensor), so each tap's weights for a tile's channels are one contiguous vector; the public
functions and the operators' parameters keep ``(C, K)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import num_sms

MAX_TAPS = 8                       # short convs only: conv_tile unrolls every tap
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- Triton helpers
@triton.jit
def conv_tile(u_ptr, w_ptr, b_ptr, rows, offs_c, row_ok, mask_c, lo, stride_un, stride_uc,
              stride_wk, K: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 causal depthwise conv on a (BLOCK_N rows, BLOCK_C channels) tile.

    ``out[r, c] = b[c] + sum_j w[c, j] * u[rows[r] - (K - 1) + j, c]``; source rows below ``lo``
    add nothing (``lo`` = 0 for a sequence of its own, negative when the previous group's
    data continues the sequence). ``u_ptr``/``w_ptr``/``b_ptr`` are already offset to this
    batch element and group; ``w`` is (K, C) with tap stride ``stride_wk`` (channels contiguous:
    the launchers pass ``weight.t().contiguous()``, so a tap's weights load as one vector).
    """
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        src = rows - (K - 1) + j
        w = tl.load(w_ptr + j * stride_wk + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        ok = (row_ok & (src >= lo))[:, None] & mask_c[None, :]
        x = tl.load(u_ptr + src[:, None] * stride_un + offs_c[None, :] * stride_uc, mask=ok, other=0.0)
        # a source row before the sequence is no term at all (not 0 * w: w may be inf or NaN)
        acc += tl.where(ok, w[None, :] * x.to(tl.float32), 0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return acc


# ----------------------------------------------------------------------------- launch helpers
def taps_major(weight: torch.Tensor) -> torch.Tensor:
    """A (C, K) filter as the kernels read it: (K, C), channels contiguous (C*K elements)."""
    return weight.t().contiguous()


def fit_tiles(tiles: tuple[int, int, int], rows: int, channels: int, taps: int,
              rows_contiguous: bool = False, interpreted: bool = False) -> tuple[int, int, int]:
    """Clamp a kernel's (BLOCK_N, BLOCK_C, num_warps) to the problem: powers of two >= 16, no
    wider than the (rounded-up) extent, fewer warps for small tiles. Under the Triton interpreter
    (``interpreted``: ``_dispatch.interpreting()``, whose cost is per program rather than per
    element) tiles are at least 64 x 64.

    Each kernel's tiles were chosen from ptxas register reports for sm_90a (bf16/fp16/fp32,
    K = 3 and 4: no spills). With channels contiguous a thread holds K weights for each of its
    channels: halve the channel width for K > 4 (rows contiguous: one channel's K weights).
    """
    bn, bc, warps = tiles
    if taps > 4 and not rows_contiguous:
        bc //= 2
    if interpreted:
        bn, bc = max(bn, 64), max(bc, 64)
    bn = max(16, min(bn, triton.next_power_of_2(rows)))
    bc = max(16, min(bc, triton.next_power_of_2(channels)))
    return bn, bc, max(1, min(warps, bn * bc // 128))


def row_splits(n_tiles: int, programs: int, device: torch.device) -> int:
    """How many programs share one channel block's row tiles in a backward kernel that sums
    its weight gradients over the rows it walks (``programs``: channel blocks x batch). Each
    program writes one fp32 partial per weight; enough of them for ~8 programs an SM, never more
    than the row tiles (bench shape, L = 4096: 8 programs of 16 tiles each)."""
    return max(1, min(n_tiles, triton.cdiv(8 * num_sms(device), programs)))


def cast_grads(grads, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(du, dweight, dbias) from an fp32 reference backward, in the dtypes the ops promise."""
    du, dw, db = grads
    return (du.to(u.dtype).contiguous(), dw.to(weight.dtype).contiguous(),
            db.to(weight.dtype if bias is None else bias.dtype))


# ----------------------------------------------------------------------------- input checks
def check_activation(name: str, x: torch.Tensor, groups: int = 1) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (batch, tokens, channels) tensor, got {shape}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}; "
                         f"cast it first")
    if x.shape[-1] % groups:
        raise ValueError(f"{name} has {x.shape[-1]} channels, not a multiple of {groups}: "
                         f"pass the in-projection output holding q, k, v side by side")


def check_filter(name: str, weight: torch.Tensor, channels: int, like: torch.Tensor,
                 what: str) -> int:
    """Check a (channels, K) depthwise filter; return K."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != channels:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name} must be ({channels}, K) ({what}), got {shape}; "
                         f"a Conv1d weight (C, 1, K) needs .squeeze(1)")
    taps = weight.shape[1]
    if not 1 <= taps <= MAX_TAPS:
        raise ValueError(f"{name} has {taps} taps; short convs take 1 to {MAX_TAPS}")
    if not weight.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    if weight.device != like.device:
        raise ValueError(f"{name} is on {weight.device} but the input is on {like.device}; "
                         f"move them to one device")
    return taps


def check_bias(name: str, bias: torch.Tensor | None, channels: int, like: torch.Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (channels,):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{name} must be ({channels},) or None, got {shape}")
    if not bias.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {bias.dtype}")
    if bias.device != like.device:
        raise ValueError(f"{name} is on {bias.device} but the input is on {like.device}; "
                         f"move them to one device")
