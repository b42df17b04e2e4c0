"""Sliding-window attention (non-causal, |i - j| <= window) as a flash-attention Triton kernel.

Reads top to bottom: Triton kernels (forward, backward pre-pass, dk/dv, dq), the launchers
``swa_fwd``/``swa_bwd``, the custom ops ``graftfx::swa``/``graftfx::swa_bwd`` with their
autograd wiring, and the public ``sliding_window_attention``.

Every program visits only the key (or query) blocks that intersect its window: a query block
``[m0, m0 + BLOCK_M)`` needs keys ``[m0 - w, m0 + BLOCK_M + w)``, so the work is
``O(L * (BLOCK + 2w))`` instead of ``O(L^2)``. The sweep has a compile-time trip count
(``N_ITERS``, from the block sizes and the window) and a run-time first block: the loop can be
unrolled and software-pipelined, and it also runs under ``TRITON_INTERPRET=1``, whose loops
accept only compile-time bounds with numpy 2. The forward keeps the running max/sum in fp32
and stores the natural-log logsumexp per query; the backward recomputes P block by block
from it (FlashAttention-2), with ``delta = rowsum(dO * O) - dlse`` computed in a pre-pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._attention import LOG2E as _LOG2E
from .._attention import align as _align, delta as _delta, dot as _dot, launch_cfg as _launch_cfg
from .._attention import strides as _strides, unit_last as _unit_last
from .._dispatch import interpreting, on_device, optional_backend, use_triton
from .naive import naive_swa, naive_swa_bwd

BACKENDS = ("triton", "flash_attn", "reference")


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _first_block(start, WINDOW, L, BLOCK: tl.constexpr, N_ITERS: tl.constexpr):
    """First inner block a program sweeps: the one holding ``start - WINDOW``, moved back
    where needed so that all ``N_ITERS`` blocks lie inside ``[0, cdiv(L, BLOCK))``."""
    first = tl.maximum(start - WINDOW, 0) // BLOCK
    return tl.minimum(first, tl.maximum(tl.cdiv(L, BLOCK) - N_ITERS, 0))


@triton.jit
def _swa_fwd_kernel(Q, K, V, O, LSE,
                    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                    H, L, WINDOW, qk_scale,
                    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    N_ITERS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Strides arrive in units of ALIGN: multiplied back by the constexpr, the compiler knows
    # every row starts 16-byte aligned (128-bit loads at head dim 72 too).
    sqb, sqh, sql = sqb * ALIGN, sqh * ALIGN, sql * ALIGN
    skb, skh, skl = skb * ALIGN, skh * ALIGN, skl * ALIGN
    svb, svh, svl = svb * ALIGN, svh * ALIGN, svl * ALIGN
    sob, soh, sol = sob * ALIGN, soh * ALIGN, sol * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit base offsets: B*H*L*D may pass 2**31
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    # A finite floor instead of -inf keeps alpha = exp2(m_old - m_new) well defined while a
    # row has seen only masked keys (and for the padded rows past L, which see none).
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    first = _first_block(m0, WINDOW, L, BLOCK_N, N_ITERS)
    for it in range(N_ITERS):
        offs_n = (first + it) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kt = tl.load(k_base + offs_n[None, :] * skl + offs_d[:, None],
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s = _dot(q, kt, PRECISION, UPCAST) * qk_scale
        dist = offs_m[:, None] - offs_n[None, :]
        keep = (dist <= WINDOW) & (dist >= -WINDOW) & n_ok[None, :]
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    # Every real query has at least itself in its window, so l_i == 0 only when every score is
    # -inf (an infinite input): NaN and -inf, as softmax gives (rows past L are not stored). A NaN
    # score is skipped by the running max but reaches l_i: the logsumexp is NaN too.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = tl.where(l_i[:, None] > 0.0, acc / l_safe[:, None], float("nan"))
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    lse = tl.where(l_i > 0.0, lse, float("-inf"))
    lse = tl.where(l_i == l_i, lse, float("nan"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * L + offs_m, lse, mask=m_ok)


@triton.jit
def _swa_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                         sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
                         H, L, WINDOW, sm_scale, qk_scale,
                         HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         N_ITERS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # One program owns a key block (BLOCK_N) and sweeps the query blocks (BLOCK_M) whose
    # window reaches it.
    sqb, sqh, sql = sqb * ALIGN, sqh * ALIGN, sql * ALIGN
    skb, skh, skl = skb * ALIGN, skh * ALIGN, skl * ALIGN
    svb, svh, svl = svb * ALIGN, svh * ALIGN, svl * ALIGN
    sdb, sdh, sdl = sdb * ALIGN, sdh * ALIGN, sdl * ALIGN
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh

    first = _first_block(n0, WINDOW, L, BLOCK_M, N_ITERS)
    for it in range(N_ITERS):
        offs_m = (first + it) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdl + offs_d[None, :], mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)

        # Transposed scores: rows are this program's keys, columns the queries.
        st = _dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
        dist = offs_m[None, :] - offs_n[:, None]
        keep = (dist <= WINDOW) & (dist >= -WINDOW) & m_ok[None, :]
        pt = tl.where(keep, tl.exp2(st - lse2[None, :]), 0.0)
        dv += _dot(pt.to(do.dtype), do, PRECISION, UPCAST)
        dpt = _dot(v, tl.trans(do), PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, PRECISION, UPCAST)

    dk = dk * sm_scale
    out = bh * L * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _swa_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                       sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
                       H, L, WINDOW, sm_scale, qk_scale,
                       HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       N_ITERS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # One program owns a query block and sweeps the key blocks inside its window.
    sqb, sqh, sql = sqb * ALIGN, sqh * ALIGN, sql * ALIGN
    skb, skh, skl = skb * ALIGN, skh * ALIGN, skl * ALIGN
    svb, svh, svl = svb * ALIGN, svh * ALIGN, svl * ALIGN
    sdb, sdh, sdl = sdb * ALIGN, sdh * ALIGN, sdl * ALIGN
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM
    q_mask = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdl + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    first = _first_block(m0, WINDOW, L, BLOCK_N, N_ITERS)
    for it in range(N_ITERS):
        offs_n = (first + it) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        dist = offs_m[:, None] - offs_n[None, :]
        keep = (dist <= WINDOW) & (dist >= -WINDOW) & n_ok[None, :]
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)

    dq = dq * sm_scale
    tl.store(DQ + bh * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------- launchers
def _inner_block(window: int) -> int:
    """The swept block: small windows sweep small blocks so that little work is masked away."""
    return 16 if window <= 16 else 32 if window <= 64 else 64


def _blocks(window: int, block_m: int | None, block_n: int | None) -> tuple[int, int]:
    """(outer, inner) block sizes given explicitly (either may be None: the default). The
    outer block is what a program owns; the inner block is what it sweeps."""
    outer, inner = block_m or 64, block_n or _inner_block(window)
    for name, val in (("block_m", outer), ("block_n", inner)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {val}")
    return outer, inner


def _n_iters(length: int, window: int, outer: int, inner: int) -> int:
    """Inner blocks that cover the window of one outer block: its keys (or queries) span
    ``outer - 1 + 2 * window`` positions at any alignment, never more than the whole row."""
    return min(triton.cdiv(length, inner), (outer - 1 + 2 * window) // inner + 2)


# Autotuned launch configurations: the owned (outer) block, warps and pipeline stages; the swept
# (inner) block follows the window. ``_fits`` keeps the configs whose owned tiles stay within
# 128 bytes per thread (64 owned rows at most in fp32), and in fp32 at most ``fp32_tile`` owned
# x padded-head-dim elements per program (fp32 products run on FMA units, whose tiles take far
# more registers: the forward's 64 x 128 tile at head dim 72 spilled 356 bytes at 8 warps): every
# config it keeps compiles without spills for sm_90 at head dims 64 and 72, bf16 and fp32
# (benchmarks/kernel_static.py, checked by tests/kernels/test_static.py). Under the interpreter
# there is one small config: CPU runs never benchmark.
def _fits(configs, named_args, **kwargs):
    elem = named_args["Q"].element_size()
    keep = [c for c in configs
            if c.kwargs[c.owned] * kwargs["BLOCK_D"] * elem <= 128 * 32 * c.num_warps
            and (elem < 4 or (c.kwargs[c.owned] <= 64
                              and c.kwargs[c.owned] * kwargs["BLOCK_D"] <= c.fp32_tile))]
    return keep or configs[-1:]


def _tuned(kernel, outer: str, inner: str, configs, fp32_tile: int):
    """``kernel`` autotuned over ``configs`` ((owned block ``outer``, warps, stages)), keyed on
    (L, WINDOW, HEAD_DIM) and the dtypes, with the swept block and trip count derived;
    ``fp32_tile``: see ``_fits``."""
    if interpreting():
        configs = configs[:1]
    heur = triton.heuristics({
        inner: lambda a: _inner_block(a["WINDOW"]),
        "N_ITERS": lambda a: _n_iters(a["L"], a["WINDOW"], a[outer], a[inner]),
    })(kernel)
    cfgs = []
    for block, warps, stages in configs:
        c = triton.Config({outer: block}, num_warps=warps, num_stages=stages)
        c.owned, c.fp32_tile = outer, fp32_tile
        cfgs.append(c)
    return triton.autotune(cfgs, key=["L", "WINDOW", "HEAD_DIM"],
                           prune_configs_by={"early_config_prune": _fits})(heur)


# (owned block, warps, stages); the last one fits everything
_FWD_CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 8, 2), (64, 8, 2), (32, 4, 2)]
_BWD_CONFIGS = [(64, 8, 2), (64, 4, 2), (128, 8, 2), (32, 4, 2)]
_swa_fwd_tuned = _tuned(_swa_fwd_kernel, "BLOCK_M", "BLOCK_N", _FWD_CONFIGS, 64 * 64)
_swa_bwd_dkdv_tuned = _tuned(_swa_bwd_dkdv_kernel, "BLOCK_N", "BLOCK_M", _BWD_CONFIGS, 64 * 128)
_swa_bwd_dq_tuned = _tuned(_swa_bwd_dq_kernel, "BLOCK_M", "BLOCK_N", _BWD_CONFIGS, 64 * 128)


def _launch(tuned, kernel, grid_block: str, L: int, window: int, explicit, args, meta):
    """Launch ``tuned`` (autotuned), or ``kernel`` with the explicit (owned, swept) blocks."""
    programs = meta.pop("_programs")
    if explicit is None:
        tuned[lambda m: (triton.cdiv(L, m[grid_block]), programs)](*args, **meta)
        return
    owned, swept = explicit
    other = "BLOCK_N" if grid_block == "BLOCK_M" else "BLOCK_M"
    kernel[(triton.cdiv(L, owned), programs)](
        *args, **meta, **{grid_block: owned, other: swept},
        N_ITERS=_n_iters(L, window, owned, swept), num_warps=8 if meta["BLOCK_D"] >= 128 else 4,
        num_stages=2)


def swa_fwd(q, k, v, window: int, scale: float | None = None,
            block_m: int | None = None, block_n: int | None = None):
    """q, k, v: (B, H, L, Dh) -> (o (B, H, L, Dh) in q.dtype, lse (B, H, L) fp32, natural log).

    Block sizes are autotuned unless ``block_m`` (queries a program owns) or ``block_n`` (keys
    it sweeps per step) is given."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, L, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    window = min(int(window), L)  # beyond L nothing changes; keeps the index math in int32
    explicit = _blocks(window, block_m, block_n) if block_m or block_n else None
    block_d, precision, upcast = _launch_cfg(q.dtype, D)
    o = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    a = _align(q, k, v, o)
    args = (q, k, v, o, lse, *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(o, a),
            H, L, window, scale * _LOG2E)
    meta = dict(HEAD_DIM=D, ALIGN=a, BLOCK_D=block_d, PRECISION=precision, UPCAST=upcast,
                _programs=B * H)
    with on_device(q):
        _launch(_swa_fwd_tuned, _swa_fwd_kernel, "BLOCK_M", L, window, explicit, args, meta)
    return o, lse


def swa_bwd(do, q, k, v, o, lse, window: int, scale: float | None = None, dlse=None,
            block_m: int | None = None, block_n: int | None = None):
    """Gradients (dq, dk, dv), each (B, H, L, Dh) in q.dtype, of ``swa_fwd``'s outputs.

    ``dlse`` (B, H, L), optional, is the gradient reaching the logsumexp output. Block sizes
    are autotuned unless given: ``block_m`` is the block a program owns (queries for dq, keys
    for dk/dv), ``block_n`` the block it sweeps per step.
    """
    q, k, v, o, do = (_unit_last(t) for t in (q, k, v, o, do))
    B, H, L, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    window = min(int(window), L)
    explicit = _blocks(window, block_m, block_n) if block_m or block_n else None
    block_d, precision, upcast = _launch_cfg(q.dtype, D)
    lse = lse.float().contiguous()
    dq = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    a = _align(q, k, v, do, dq)
    common = (*_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(do, a),
              H, L, window, scale, scale * _LOG2E)
    meta = dict(HEAD_DIM=D, ALIGN=a, BLOCK_D=block_d, PRECISION=precision, UPCAST=upcast)
    with on_device(q):
        delta = _delta(o, do, dlse)
        # dk/dv: programs own key blocks (BLOCK_N) and sweep query blocks (BLOCK_M).
        _launch(_swa_bwd_dkdv_tuned, _swa_bwd_dkdv_kernel, "BLOCK_N", L, window,
                explicit, (q, k, v, do, lse, delta, dk, dv, *common), {**meta, "_programs": B * H})
        _launch(_swa_bwd_dq_tuned, _swa_bwd_dq_kernel, "BLOCK_M", L, window,
                explicit, (q, k, v, do, lse, delta, dq, *common), {**meta, "_programs": B * H})
    return dq, dk, dv


def flash_attn_available() -> bool:
    """True when the optional flash_attn package is importable."""
    return optional_backend("flash_attn")


def swa_flash_attn(q, k, v, window: int, scale: float) -> torch.Tensor:
    """The same attention through flash_attn_func(window_size=(window, window))."""
    if not flash_attn_available():
        raise ValueError("backend='flash_attn' needs the flash_attn package, which is not "
                         "installed; use backend='triton'")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"backend='flash_attn' needs CUDA fp16/bf16 tensors, got {q.dtype} on "
                         f"{q.device}; use backend='triton'")
    from flash_attn import flash_attn_func

    window = min(window, q.shape[-2])
    o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        dropout_p=0.0, softmax_scale=scale, causal=False,
                        window_size=(window, window))
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("graftfx::swa", mutates_args=())
def swa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of sliding-window attention; Triton or the fp32 reference (see _dispatch)."""
    if use_triton(q):
        return swa_fwd(q, k, v, window, scale)
    o, lse = naive_swa(q, k, v, window, scale)
    return o.to(q.dtype).contiguous(), lse.contiguous()


@swa_op.register_fake
def _swa_fake(q, k, v, window, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("graftfx::swa_bwd", mutates_args=())
def swa_bwd_op(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, window: int,
               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return swa_bwd(do, q, k, v, o, lse, window, scale, dlse=dlse)
    grads = naive_swa_bwd(do, dlse, q, k, v, window, scale)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))


@swa_bwd_op.register_fake
def _swa_bwd_fake(do, dlse, q, k, v, o, lse, window, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _swa_setup(ctx, inputs, output):
    q, k, v, window, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.window, ctx.scale = window, scale


def _swa_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = swa_bwd_op(do, dlse, q, k, v, o, lse, ctx.window, ctx.scale)
    return dq, dk, dv, None, None


swa_op.register_autograd(_swa_backward, setup_context=_swa_setup)


# ----------------------------------------------------------------------------- public function
def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = 4,
                             scale: float | None = None, backend: str = "triton",
                             return_lse: bool = False):
    """Non-causal sliding-window attention: query i attends to keys j with |i - j| <= window.

    q, k, v: (B, heads, L, head_dim), fp32/bf16/fp16, same shape, dtype and device. Returns o
    with q's shape and dtype (and the fp32 logsumexp (B, heads, L) when ``return_lse``).
    ``backend``: "triton" (the graftfx::swa custom op: Triton on GPU, fp32 reference on CPU),
    "flash_attn" (flash_attn_func with window_size=(window, window); CUDA, fp16/bf16) or
    "reference" (plain PyTorch, autograd).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, L, head_dim), "
                             f"got {getattr(t, 'shape', type(t))}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k and v must have q's shape {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k and v must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim must be <= 256, got {q.shape[-1]}; use more heads")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (keys with |i - j| <= window), "
                         f"got {window!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    if backend == "reference":
        o, lse = naive_swa(q, k, v, window, scale)
        return (o.to(q.dtype), lse) if return_lse else o.to(q.dtype)
    if backend == "flash_attn":
        if return_lse:
            raise ValueError("return_lse is not available with backend='flash_attn'; "
                             "use backend='triton'")
        return swa_flash_attn(q, k, v, window, scale)
    o, lse = swa_op(q, k, v, window, scale)
    return (o, lse) if return_lse else o


__all__ = ["BACKENDS", "flash_attn_available", "sliding_window_attention", "swa_bwd",
           "swa_bwd_op", "swa_flash_attn", "swa_fwd", "swa_op"]
