"""What the flash-style attention kernels (swa, nat2d) share: the fp32-accumulating dot, the
backward's ``delta = rowsum(dO * O) - dlse`` pre-pass, strides the compiler can vectorise with,
and the launch configuration."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, on_device

LOG2E = 1.4426950408889634


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST (the CPU interpreter only) multiplies fp32 copies of
    bf16/fp16 operands, which is what the tensor cores compute: the interpreter's own
    bf16 dot multiplies raw bit patterns."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def bwd_delta_kernel(O, DO, DLSE, DELTA,
                     sob, soh, sol, sdb, sdh, sdl,
                     H, L,
                     HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr):
    sob, soh, sol = sob * ALIGN, soh * ALIGN, sol * ALIGN     # strides in units of ALIGN
    sdb, sdh, sdl = sdb * ALIGN, sdh * ALIGN, sdl * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
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


def align(*tensors: torch.Tensor) -> int:
    """The largest element count, up to 16 bytes' worth, dividing every stride (but the unit
    last) of every tensor: the kernels take strides in units of it (``ALIGN``) and multiply them
    back by the constexpr, so the compiler knows each row starts on a 16-byte boundary and
    issues 128-bit loads. Head views of a packed projection (head stride 72, row stride 3456)
    get 8 for bf16; Triton's own specialisation only sees strides divisible by 16."""
    a = max(1, 16 // tensors[0].element_size())
    while a > 1 and any(s % a for t in tensors for s in t.stride()[:-1]):
        a //= 2
    return a


def strides(t: torch.Tensor, a: int = 1) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, L, D) tensor, in units of ``a`` (see ``align``)."""
    return t.stride(0) // a, t.stride(1) // a, t.stride(2) // a


def launch_cfg(dtype: torch.dtype, head_dim: int):
    """(BLOCK_D, dot precision, UPCAST): the head dim padded to a power of two (tl.dot), IEEE
    fp32 products for fp32, and the interpreter-only fp32 upcast of bf16/fp16 dot operands."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return block_d, precision, interpreting() and dtype != torch.float32


def delta(o, do, dlse, block_m: int = 64) -> torch.Tensor:
    """``rowsum(dO * O) - dlse`` per query, (B, H, L) fp32: the backward pre-pass."""
    B, H, L, D = o.shape
    block_d, _, _ = launch_cfg(o.dtype, D)
    out = torch.empty((B, H, L), dtype=torch.float32, device=o.device)
    a = align(o, do)
    dlse_arg = dlse.float().contiguous() if dlse is not None else out
    with on_device(o):
        bwd_delta_kernel[(triton.cdiv(L, block_m), B * H)](
            o, do, dlse_arg, out, *strides(o, a), *strides(do, a), H, L,
            HEAD_DIM=D, ALIGN=a, BLOCK_M=block_m, BLOCK_D=block_d, HAS_DLSE=dlse is not None,
            num_warps=4)
    return out
