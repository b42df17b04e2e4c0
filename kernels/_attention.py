"""What the flash-style attention kernels (swa, nat2d) share: the fp32-accumulating dot, the
backward's ``delta = rowsum(dO * O) - dlse`` pre-pass, and the launch configuration."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST (CPU interpreter only) multiplies fp32 copies of
    bf16/fp16 operands, which is what the tensor cores compute: the interpreter's own
    bf16 dot multiplies raw bit patterns."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def bwd_delta_kernel(O, DO, DLSE, DELTA,
                          sob, soh, sol, sdb, sdh, sdl,
                          H, L, D,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * L + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * L + offs_m, delta, mask=m_ok)


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the head dim with unit stride; other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def launch_cfg(dtype: torch.dtype, device: torch.device, head_dim: int):
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if dtype == torch.float32 else "tf32"
    num_warps = 8 if block_d >= 128 else 4
    return block_d, precision, num_warps, device.type == "cpu" and dtype != torch.float32
