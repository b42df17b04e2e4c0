"""Mamba-2 SSD chunked scan in Triton: forward and backward, as the torch custom op
``graftfx::ssd_scan`` (backward: ``graftfx::ssd_scan_bwd``).

    h_t = exp(dt_t * A) h_{t-1} + dt_t * B_t x_t^T ;   y_t = C_t^T h_t + D * x_t

x (batch, L, nheads, headdim); dt (batch, L, nheads), positive; A (nheads,), negative;
B, C (batch, L, ngroups, d_state); D (nheads,). The math is ``naive.ssd_chunked``.

The sequence is cut into chunks of Q = ``chunk_size`` tokens (a power of two, 16..256). With
acs = the within-chunk cumulative sum of dt * A, a chunk's output is

    y = (C B^T * exp(acs_t - acs_s) [s <= t] * dt_s) x  +  exp(acs_t) C h_in  +  D x

where h_in is the state entering the chunk, and h_out = exp(acs_Q) h_in + B^T (w * x) with
w_s = exp(acs_Q - acs_s) dt_s. Kernels (flash-linear-attention layout: sequential in the
state, parallel over chunks in the quadratic part):

forward
  1. ``_ssd_state_fwd_kernel``   grid (batch*nheads, n-blocks, p-blocks): walks the chunks
     in order, stores each chunk's entering state h_in (fp32) and passes the state on.
  2. ``_ssd_out_fwd_kernel``     grid (chunks, batch*nheads, p-blocks): intra-chunk masked
     quadratic form + the entering state's read-out + the D skip.
backward (recomputes the chunk states with kernel 1; nothing but the inputs is saved)
  3. ``_ssd_dstate_bwd_kernel``  grid (batch*nheads, n-blocks, p-blocks): walks the chunks
     backwards, storing dL/dh_out of each chunk (fp32).
  4. ``_ssd_chunk_bwd_kernel``   grid (chunks, batch*nheads): dx, dB/dC summed over the heads
     of a group in the kernel (fp32 atomic adds into (batch, L, ngroups, d_state): the order of
     the additions, hence the last bits, may vary from run to run), ddt (its dt*A part through
     a reverse cumsum of d acs), and per-chunk partial sums of dA and dD (summed in PyTorch).

The backward is Triton throughout (no autograd recomputation through the reference).
All accumulation is fp32; x, B, C, y and the gradients are loaded/stored in their own dtypes.
Matrix products run on tensor cores in the input dtype (fp32 inputs: 3xTF32, accurate to fp32
rounding; IEEE FMA products took so many registers that kernels 2 and 4 spilled).
Under TRITON_INTERPRET=1 bf16 operands are upcast to fp32 before ``tl.dot``: the interpreter
(Triton 3.6) multiplies bf16 bit patterns as integers.

Sized for the paper's config (d_state 64, headdim 16, chunk 64): compiled for sm_90, no kernel
spills registers there, bf16 or fp32 (fp32 runs kernel 4 as three launches: dx, ddt, dB/dC),
and every x/B/C/dy load is 128 bits wide (bf16 runs kernel 4 at 4 warps for that). Kernel 4
holds whole d_state x headdim tiles; in bf16 at d_state 128 or headdim 64 it still does not
spill (8 warps; at d_state 128, headdim 16 its x/dy loads are 64 bits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import interpreting, on_device, use_triton
from .naive import ssd_chunked


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _ssd_state_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, states_ptr, L, H, G, N, P, NC,
                          sxb, sxl, sxh, sbb, sbl, sbg,
                          BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                          DOT: tl.constexpr, PREC: tl.constexpr):
    i_bh, i_n, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    a_h = tl.load(A_ptr + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_n = i_n * BN + tl.arange(0, BN)
    o_p = i_p * BP + tl.arange(0, BP)
    m_n, m_p = o_n < N, o_p < P

    x_base = x_ptr + i_b.to(tl.int64) * sxb + i_h * sxh
    dt_base = dt_ptr + i_b.to(tl.int64) * L * H + i_h
    b_base = B_ptr + i_b.to(tl.int64) * sbb + i_g * sbg
    s_base = states_ptr + i_bh.to(tl.int64) * NC * N * P
    s_offs = o_n[:, None] * P + o_p[None, :]
    s_mask = m_n[:, None] & m_p[None, :]

    h = tl.zeros((BN, BP), dtype=tl.float32)
    i_c = 0
    # `while`, not `for i_c in range(NC)`: the interpreter cannot index a runtime loop bound
    while i_c < NC:
        tl.store(s_base + i_c * N * P + s_offs, h, mask=s_mask)
        t = i_c * BT + o_t
        m_t = t < L
        dt = tl.load(dt_base + t * H, mask=m_t, other=0.0).to(tl.float32)
        a = dt * a_h
        acs = tl.cumsum(a, axis=0)
        a_last = tl.sum(a, axis=0)
        w = tl.exp(a_last - acs) * dt                                    # (BT,)
        b = tl.load(b_base + t[:, None] * sbl + o_n[None, :],
                    mask=m_t[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_base + t[:, None] * sxl + o_p[None, :],
                    mask=m_t[:, None] & m_p[None, :], other=0.0)
        bw = (b * w[:, None]).to(DOT)
        h = h * tl.exp(a_last) + tl.dot(tl.trans(bw), x.to(DOT), input_precision=PREC)
        i_c += 1


@triton.jit
def _ssd_out_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, states_ptr, y_ptr,
                        L, H, G, N, P, NC, sxb, sxl, sxh, sbb, sbl, sbg, scb, scl, scg,
                        BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                        DOT: tl.constexpr, PREC: tl.constexpr):
    i_c, i_bh, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    a_h = tl.load(A_ptr + i_h).to(tl.float32)
    d_h = tl.load(D_ptr + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_n = tl.arange(0, BN)
    o_p = i_p * BP + tl.arange(0, BP)
    t = i_c * BT + o_t
    m_t, m_n, m_p = t < L, o_n < N, o_p < P
    m_tn = m_t[:, None] & m_n[None, :]
    m_tp = m_t[:, None] & m_p[None, :]

    dt_offs = i_b.to(tl.int64) * L * H + t * H + i_h
    dt = tl.load(dt_ptr + dt_offs, mask=m_t, other=0.0).to(tl.float32)
    acs = tl.cumsum(dt * a_h, axis=0)

    b_offs = i_b.to(tl.int64) * sbb + t[:, None] * sbl + i_g * sbg + o_n[None, :]
    c_offs = i_b.to(tl.int64) * scb + t[:, None] * scl + i_g * scg + o_n[None, :]
    b = tl.load(B_ptr + b_offs, mask=m_tn, other=0.0)
    c = tl.load(C_ptr + c_offs, mask=m_tn, other=0.0)
    x_offs = i_b.to(tl.int64) * sxb + t[:, None] * sxl + i_h * sxh + o_p[None, :]
    x = tl.load(x_ptr + x_offs, mask=m_tp, other=0.0)
    y_offs = i_b.to(tl.int64) * L * H * P + t[:, None] * H * P + i_h * P + o_p[None, :]

    # intra-chunk: (C B^T) masked by exp(acs_t - acs_s) for s <= t, scaled by dt_s
    cb = tl.dot(c.to(DOT), tl.trans(b.to(DOT)), input_precision=PREC)     # (BT, BT)
    causal = o_t[:, None] >= o_t[None, :]
    decay = tl.where(causal, tl.exp(tl.where(causal, acs[:, None] - acs[None, :], 0.0)), 0.0)
    m = cb * decay * dt[None, :]
    y = tl.dot(m.to(DOT), x.to(DOT), input_precision=PREC)

    # the entering state, decayed to each position
    s_offs = (i_bh.to(tl.int64) * NC + i_c) * N * P + o_n[:, None] * P + o_p[None, :]
    h = tl.load(states_ptr + s_offs, mask=m_n[:, None] & m_p[None, :], other=0.0)
    y += tl.exp(acs)[:, None] * tl.dot(c.to(DOT), h.to(DOT), input_precision=PREC)
    y += d_h * x.to(tl.float32)
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=m_tp)


@triton.jit
def _ssd_dstate_bwd_kernel(dy_ptr, dt_ptr, A_ptr, C_ptr, dstates_ptr, L, H, G, N, P, NC,
                           syb, syl, syh, scb, scl, scg,
                           BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                           DOT: tl.constexpr, PREC: tl.constexpr):
    i_bh, i_n, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    a_h = tl.load(A_ptr + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_n = i_n * BN + tl.arange(0, BN)
    o_p = i_p * BP + tl.arange(0, BP)
    m_n, m_p = o_n < N, o_p < P

    dy_base = dy_ptr + i_b.to(tl.int64) * syb + i_h * syh
    dt_base = dt_ptr + i_b.to(tl.int64) * L * H + i_h
    c_base = C_ptr + i_b.to(tl.int64) * scb + i_g * scg
    s_base = dstates_ptr + i_bh.to(tl.int64) * NC * N * P
    s_offs = o_n[:, None] * P + o_p[None, :]
    s_mask = m_n[:, None] & m_p[None, :]

    dh = tl.zeros((BN, BP), dtype=tl.float32)      # dL/dh_out of the current chunk
    i_c = NC - 1
    while i_c >= 0:
        tl.store(s_base + i_c * N * P + s_offs, dh, mask=s_mask)
        t = i_c * BT + o_t
        m_t = t < L
        dt = tl.load(dt_base + t * H, mask=m_t, other=0.0).to(tl.float32)
        a = dt * a_h
        acs = tl.cumsum(a, axis=0)
        a_last = tl.sum(a, axis=0)
        c = tl.load(c_base + t[:, None] * scl + o_n[None, :],
                    mask=m_t[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        dy = tl.load(dy_base + t[:, None] * syl + o_p[None, :],
                     mask=m_t[:, None] & m_p[None, :], other=0.0)
        ce = (c * tl.exp(acs)[:, None]).to(DOT)
        dh = dh * tl.exp(a_last) + tl.dot(tl.trans(ce), dy.to(DOT), input_precision=PREC)
        i_c -= 1


@triton.jit
def _ssd_chunk_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dy_ptr, states_ptr,
                          dstates_ptr, dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr,
                          L, H, G, N, P, NC, sxb, sxl, sxh, syb, syl, syh,
                          sbb, sbl, sbg, scb, scl, scg,
                          BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                          DOT: tl.constexpr, PREC: tl.constexpr,
                          DO_DX: tl.constexpr, DO_DDT: tl.constexpr, DO_DBC: tl.constexpr):
    # DO_DX: dx; DO_DDT: ddt and the dA/dD partials; DO_DBC: dB and dC. One launch does all
    # three (bf16/fp16), or one launch each (fp32: its 3xTF32 operands take twice the registers,
    # and one program holding every tile spilled), each recomputing the products it needs.
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    a_h = tl.load(A_ptr + i_h).to(tl.float32)
    d_h = tl.load(D_ptr + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_n = tl.arange(0, BN)
    o_p = tl.arange(0, BP)
    t = i_c * BT + o_t
    m_t, m_n, m_p = t < L, o_n < N, o_p < P
    m_tn = m_t[:, None] & m_n[None, :]
    m_tp = m_t[:, None] & m_p[None, :]
    m_np = m_n[:, None] & m_p[None, :]

    dt_offs = i_b.to(tl.int64) * L * H + t * H + i_h
    dt = tl.load(dt_ptr + dt_offs, mask=m_t, other=0.0).to(tl.float32)
    a = dt * a_h
    acs = tl.cumsum(a, axis=0)
    a_last = tl.sum(a, axis=0)
    e_acs = tl.exp(acs)
    to_end = tl.exp(a_last - acs)
    w = to_end * dt

    b = tl.load(B_ptr + i_b.to(tl.int64) * sbb + t[:, None] * sbl + i_g * sbg + o_n[None, :],
                mask=m_tn, other=0.0)
    c = tl.load(C_ptr + i_b.to(tl.int64) * scb + t[:, None] * scl + i_g * scg + o_n[None, :],
                mask=m_tn, other=0.0)
    x = tl.load(x_ptr + i_b.to(tl.int64) * sxb + t[:, None] * sxl + i_h * sxh + o_p[None, :],
                mask=m_tp, other=0.0)
    dy = tl.load(dy_ptr + i_b.to(tl.int64) * syb + t[:, None] * syl + i_h * syh + o_p[None, :],
                 mask=m_tp, other=0.0)
    # outputs: contiguous dx (batch, L, nheads, headdim), dB/dC (batch, L, ngroups, d_state)
    bc_offs = i_b.to(tl.int64) * L * G * N + t[:, None] * G * N + i_g * N + o_n[None, :]
    xy_offs = i_b.to(tl.int64) * L * H * P + t[:, None] * H * P + i_h * P + o_p[None, :]
    s_offs = (i_bh.to(tl.int64) * NC + i_c) * N * P + o_n[:, None] * P + o_p[None, :]
    h_in = tl.load(states_ptr + s_offs, mask=m_np, other=0.0)
    dh_out = tl.load(dstates_ptr + s_offs, mask=m_np, other=0.0)

    b_d, c_d, x_d, dy_d = b.to(DOT), c.to(DOT), x.to(DOT), dy.to(DOT)
    h_in_d, dh_out_d = h_in.to(DOT), dh_out.to(DOT)

    # Intra-chunk: y_t = sum_{s<=t} cb_ts decay_ts dt_s x_s. Each product is computed once (the
    # compiler merges repeats anyway, keeping the first alive until the last use) and the
    # (BT, BT) tiles die in turn: cb and decay through dx, then q and dg, then only dg. Ordered
    # so, bf16 fits 4 warps without spilling (the x/dy loads' 128-bit vectors need 4 warps).
    causal = o_t[:, None] >= o_t[None, :]
    decay = tl.where(causal, tl.exp(tl.where(causal, acs[:, None] - acs[None, :], 0.0)), 0.0)
    cb = tl.dot(c_d, tl.trans(b_d), input_precision=PREC)                # C_t . B_s
    if DO_DX:
        m = cb * decay * dt[None, :]                                     # y_intra = m @ x
        dx = tl.dot(tl.trans(m.to(DOT)), dy_d, input_precision=PREC)
        # dx: + D skip + through the chunk's state contribution B^T (w * x)
        dx += d_h * dy.to(tl.float32) + w[:, None] * tl.dot(b_d, dh_out_d, input_precision=PREC)
        tl.store(dx_ptr + xy_offs, dx.to(dx_ptr.dtype.element_ty), mask=m_tp)
    if DO_DDT or DO_DBC:
        q = tl.dot(dy_d, tl.trans(x_d), input_precision=PREC) * decay     # dy_t . x_s decay_ts
        dg = q * dt[None, :]                                             # dL/d(C B^T)
    if DO_DDT:
        e = cb * q                  # dL/d(dt_s) summands of the intra-chunk term
        ddt = tl.sum(e, axis=0)
        # d acs from the intra-chunk term: +row sums, -column sums of e * dt_s (= cb * dg)
        dacs = tl.sum(cb * dg, axis=1) - ddt * dt
    if DO_DBC:
        # dC (per head): intra-chunk + the entering state's read-out y_off = exp(acs_t) C_t h_in
        dc = tl.dot(dg.to(DOT), b_d, input_precision=PREC)
        dc += e_acs[:, None] * tl.dot(dy_d, tl.trans(h_in_d), input_precision=PREC)
        # summed over the group's heads here (fp32 atomics into the (batch, L, G, N) gradients):
        # no per-head (batch, L, nheads, N) buffer, 144x B's size at the paper's config
        tl.atomic_add(dC_ptr + bc_offs, dc, mask=m_tn, sem="relaxed")
        db = tl.dot(tl.trans(dg.to(DOT)), c_d, input_precision=PREC)
    if DO_DDT or DO_DBC:
        xdh = tl.dot(x_d, tl.trans(dh_out_d), input_precision=PREC)      # (BT, BN)
    if DO_DBC:
        # dB (per head): intra-chunk + the chunk state B^T (w * x)
        db += w[:, None] * xdh
        tl.atomic_add(dB_ptr + bc_offs, db, mask=m_tn, sem="relaxed")
    if DO_DDT:
        dw = tl.sum(b.to(tl.float32) * xdh, axis=1)                      # dL/dw_s
        # d acs_Q through the entering state's decay exp(acs_Q) h_in, and through w
        dlast = (tl.exp(a_last) * tl.sum(tl.sum(dh_out * h_in, axis=1), axis=0)
                 + tl.sum(dw * w, axis=0))
        # d acs from the read-out of the entering state y_off and from w
        y_off = e_acs[:, None] * tl.dot(c_d, h_in_d, input_precision=PREC)
        dacs += tl.sum(y_off * dy.to(tl.float32), axis=1) - dw * w
        # ddt: its direct uses (the scale dt_s, and inside w), then through acs;
        # da_s = sum_{t >= s} dacs_t (+ dlast: acs_Q is the sum of every a in the chunk)
        da = tl.sum(dacs, axis=0) - tl.cumsum(dacs, axis=0) + dacs + dlast
        ddt += to_end * dw + a_h * da
        tl.store(ddt_ptr + dt_offs, ddt, mask=m_t)
        part = i_bh.to(tl.int64) * NC + i_c
        tl.store(dA_ptr + part, tl.sum(dt * da, axis=0))
        tl.store(dD_ptr + part, tl.sum(tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=1), axis=0))


# ----------------------------------------------------------------------------- launchers

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_config(dtype: torch.dtype) -> tuple:
    """(operand dtype for tl.dot, input_precision) for inputs of ``dtype``: fp32 as 3xTF32 on a
    GPU (the interpreter's fp32 dot is exact fp32 either way)."""
    if dtype == torch.float32:
        return tl.float32, "ieee" if interpreting() else "tf32x3"
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32, "ieee"
    return _TL[dtype], "tf32"


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """x, B, C, dy are indexed with their own (batch, L, head/group) strides; only the last
    axis must be unit-stride (a copy only then)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _st(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, L, head-or-group) strides of a (batch, L, heads, n) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _block(n: int, cap: int) -> int:
    return max(16, min(triton.next_power_of_2(n), cap))


def _states_fwd(x, dt, A, B, chunk_size: int) -> torch.Tensor:
    """Each chunk's entering state, (batch, nheads, chunks, d_state, headdim) fp32."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc = triton.cdiv(L, chunk_size)
    BN, BP = _block(N, 64), _block(P, 64)
    dot, prec = _dot_config(x.dtype)
    states = torch.empty(batch, H, nc, N, P, device=x.device, dtype=torch.float32)
    grid = (batch * H, triton.cdiv(N, BN), triton.cdiv(P, BP))
    with on_device(x):
        _ssd_state_fwd_kernel[grid](x, dt, A, B, states, L, H, G, N, P, nc, *_st(x), *_st(B),
                                    BT=chunk_size, BN=BN, BP=BP, DOT=dot, PREC=prec, num_warps=4)
    return states


def ssd_fwd(x, dt, A, B, C, D, chunk_size: int = 64) -> torch.Tensor:
    """Forward launcher: y (batch, L, nheads, headdim) in x's dtype."""
    x, B, C = _unit_last(x), _unit_last(B), _unit_last(C)     # strided views stay views
    dt, A, D = dt.contiguous(), A.contiguous(), D.contiguous()
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc = triton.cdiv(L, chunk_size)
    states = _states_fwd(x, dt, A, B, chunk_size)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    BN, BP = _block(N, 256), _block(P, 64)
    dot, prec = _dot_config(x.dtype)
    grid = (nc, batch * H, triton.cdiv(P, BP))
    with on_device(x):
        _ssd_out_fwd_kernel[grid](x, dt, A, B, C, D, states, y, L, H, G, N, P, nc,
                                  *_st(x), *_st(B), *_st(C),
                                  BT=chunk_size, BN=BN, BP=BP, DOT=dot, PREC=prec,
                                  num_warps=8 if BN * BP >= 64 * 64 else 4)
    return y


def ssd_bwd(dy, x, dt, A, B, C, D, chunk_size: int = 64):
    """Backward launcher: (dx, ddt, dA, dB, dC, dD), each in its input's dtype."""
    dy, x, B, C = _unit_last(dy), _unit_last(x), _unit_last(B), _unit_last(C)
    dt, A, D = dt.contiguous(), A.contiguous(), D.contiguous()
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc = triton.cdiv(L, chunk_size)
    dot, prec = _dot_config(x.dtype)
    states = _states_fwd(x, dt, A, B, chunk_size)

    BN, BP = _block(N, 64), _block(P, 64)
    dstates = torch.empty_like(states)
    grid = (batch * H, triton.cdiv(N, BN), triton.cdiv(P, BP))
    with on_device(x):
        _ssd_dstate_bwd_kernel[grid](dy, dt, A, C, dstates, L, H, G, N, P, nc, *_st(dy), *_st(C),
                                     BT=chunk_size, BN=BN, BP=BP, DOT=dot, PREC=prec, num_warps=4)

    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    ddt = torch.empty(batch, L, H, device=x.device, dtype=torch.float32)
    dB_g = torch.zeros(batch, L, G, N, device=x.device, dtype=torch.float32)
    dC_g = torch.zeros_like(dB_g)
    dA_part = torch.empty(batch, H, nc, device=x.device, dtype=torch.float32)
    dD_part = torch.empty_like(dA_part)
    BN, BP = _block(N, 256), _block(P, 256)
    args = (x, dt, A, B, C, D, dy, states, dstates, dx, ddt, dB_g, dC_g, dA_part, dD_part,
            L, H, G, N, P, nc, *_st(x), *_st(dy), *_st(B), *_st(C))
    # fp32: three launches (dx, ddt, dB/dC), each holding part of the tiles; bf16/fp16: one.
    # 8 warps, or 4 where 8 would leave a thread under 16 bytes of the x/dy tile (the paper's
    # (64, 16): 4 warps load 128-bit vectors, 8 load 64) and the (BT, BN) tiles are small enough
    # not to spill at 4 (d_state 128 at 4 warps spills: it stays at 8 and loads 64 bits)
    fp32 = x.dtype == torch.float32
    parts = ([(True, False, False), (False, True, False), (False, False, True)] if fp32
             else [(True, True, True)])
    warps = 4 if (chunk_size * BP * x.element_size() < 16 * 256 and chunk_size * BN <= 64 * 64
                  and not fp32) else 8
    with on_device(x):
        for do_dx, do_ddt, do_dbc in parts:
            _ssd_chunk_bwd_kernel[(nc, batch * H)](*args, BT=chunk_size, BN=BN, BP=BP,
                                                   DOT=dot, PREC=prec, DO_DX=do_dx, DO_DDT=do_ddt,
                                                   DO_DBC=do_dbc, num_warps=warps)
    dB, dC = dB_g.to(B.dtype), dC_g.to(C.dtype)
    dA = dA_part.sum((0, 2)).to(A.dtype)
    dD = dD_part.sum((0, 2)).to(D.dtype)
    return dx, ddt.to(dt.dtype), dA, dB, dC, dD


# ----------------------------------------------------------------------------- custom op

def _reference_fwd(x, dt, A, B, C, D, chunk_size):
    return ssd_chunked(x, dt, A, B, C, D, chunk_size).to(x.dtype).contiguous()


def _reference_bwd(dy, x, dt, A, B, C, D, chunk_size):
    # torch.func.vjp, not torch.autograd: a custom op's body runs below the autograd key.
    inputs = (x, dt, A, B, C, D)
    _, vjp = torch.func.vjp(lambda *a: ssd_chunked(*a, chunk_size), *(t.float() for t in inputs))
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(vjp(dy.float()), inputs))


@torch.library.custom_op("graftfx::ssd_scan", mutates_args=())
def _ssd_scan_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor, chunk_size: int) -> torch.Tensor:
    if use_triton(x):
        return ssd_fwd(x, dt, A, B, C, D, chunk_size)
    return _reference_fwd(x, dt, A, B, C, D, chunk_size)


@_ssd_scan_op.register_fake
def _(x, dt, A, B, C, D, chunk_size):
    return x.new_empty(x.shape)


@torch.library.custom_op("graftfx::ssd_scan_bwd", mutates_args=())
def _ssd_scan_bwd_op(dy: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                     B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, chunk_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return ssd_bwd(dy, x, dt, A, B, C, D, chunk_size)
    return _reference_bwd(dy, x, dt, A, B, C, D, chunk_size)


@_ssd_scan_bwd_op.register_fake
def _(dy, x, dt, A, B, C, D, chunk_size):
    # contiguous, whatever the inputs' strides (x, B, C are views into the conv output): what
    # both paths return. ``empty_like`` would copy a view's strides and mislead the compiler.
    return tuple(t.new_empty(t.shape) for t in (x, dt, A, B, C, D))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, chunk_size = inputs
    ctx.save_for_backward(x, dt, A, B, C, D)
    ctx.chunk_size = chunk_size


def _backward(ctx, dy):
    grads = torch.ops.graftfx.ssd_scan_bwd(dy, *ctx.saved_tensors, ctx.chunk_size)
    return (*grads, None)


_ssd_scan_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """Mamba-2 SSD scan: y (batch, L, nheads, headdim) in x's dtype, differentiable.

    x (batch, L, nheads, headdim); dt (batch, L, nheads), positive (softplus(dt + bias));
    A (nheads,) negative; B, C (batch, L, ngroups, d_state); D (nheads,). The state starts
    at zero. Runs the Triton kernels on CUDA (see ``graftfx.kernels._dispatch``), else the
    chunked PyTorch reference.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, L, nheads, headdim), got shape {tuple(x.shape)}")
    batch, L, H, P = x.shape
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if tuple(dt.shape) != (batch, L, H):
        raise ValueError(f"dt must be (batch, L, nheads) = {(batch, L, H)}, got {tuple(dt.shape)}")
    if B.dim() != 4 or tuple(B.shape[:2]) != (batch, L):
        raise ValueError(f"B must be (batch, L, ngroups, d_state) with batch, L = {batch}, {L}, "
                         f"got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    G, N = B.shape[2], B.shape[3]
    if G < 1 or H % G:
        raise ValueError(f"B/C ngroups ({G}) must divide nheads ({H})")
    for name, t in (("A", A), ("D", D)):
        if tuple(t.shape) != (H,):
            raise ValueError(f"{name} must be (nheads,) = ({H},), got {tuple(t.shape)}")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them together")
    if B.dtype != x.dtype or C.dtype != x.dtype:
        raise ValueError(f"B and C must have x's dtype {x.dtype}, got {B.dtype} and {C.dtype}")
    if not (16 <= chunk_size <= 256) or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two in 16..256, got {chunk_size}")
    if N > 256:
        raise ValueError(f"d_state must be <= 256, got {N}")
    if P > 256:
        raise ValueError(f"headdim must be <= 256, got {P}")
    if L == 0 or batch == 0:
        raise ValueError(f"x must hold at least one sample and one token, got {tuple(x.shape)}")
    return _ssd_scan_op(x, dt, A, B, C, D, chunk_size)
