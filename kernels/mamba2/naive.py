"""fp32 PyTorch references for the Mamba-2 SSD scan (scalar-times-identity A per head).

    h_t = exp(dt_t * A) h_{t-1} + dt_t * B_t x_t^T        h: (d_state, headdim) per head
    y_t = C_t^T h_t + D * x_t

Shapes: x (batch, L, nheads, headdim), dt (batch, L, nheads) (already softplus(dt + bias),
positive), A (nheads,) negative, B and C (batch, L, ngroups, d_state), D (nheads,). Head ``h``
reads group ``h // (nheads // ngroups)``. The state starts at zero.

Two references, tested against each other:

- ``ssd_recurrent``: the recurrence above, one token at a time. The oracle.
- ``ssd_chunked``: the chunked SSD algorithm in plain PyTorch. Within a chunk of Q tokens
  the output is a masked quadratic form (C B^T times the segment-sum decay mask); chunk
  states are passed from chunk to chunk. The Triton kernel computes exactly this.

Both compute in fp32 (fp64 if given fp64), return that dtype and are differentiable with autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Upcast to fp32 (fp64 stays fp64, for checking the references themselves)."""
    return [t if t.dtype == torch.float64 else t.float() for t in tensors]


def _heads(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(batch, L, ngroups, n) -> (batch, L, nheads, n): each head gets its group's row."""
    return t.repeat_interleave(nheads // t.shape[2], dim=2)


def ssd_recurrent(x, dt, A, B, C, D) -> torch.Tensor:
    """The SSD recurrence token by token (the oracle). Returns y (batch, L, nheads, headdim)."""
    x, dt, A, B, C, D = _fp32(x, dt, A, B, C, D)
    batch, L, nheads, headdim = x.shape
    B, C = _heads(B, nheads), _heads(C, nheads)
    decay = torch.exp(dt * A)[..., None, None]                   # (batch, L, nheads, 1, 1)
    inject = (dt[..., None, None] * B[..., :, None] * x[..., None, :])  # (batch, L, nheads, n, p)
    h = x.new_zeros(batch, nheads, B.shape[-1], headdim)
    states = []
    for t in range(L):
        h = decay[:, t] * h + inject[:, t]
        states.append(h)
    states = torch.stack(states, dim=1)                         # h_t for every t
    return torch.einsum("blhn,blhnp->blhp", C, states) + D[:, None] * x


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., Q) -> (..., Q, Q): out[t, s] = a[s+1] + ... + a[t] for s <= t, -inf above."""
    Q = a.shape[-1]
    cs = a.cumsum(-1)
    seg = cs[..., :, None] - cs[..., None, :]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()
    return seg.masked_fill(~causal, float("-inf"))


def ssd_chunked(x, dt, A, B, C, D, chunk_size: int = 64) -> torch.Tensor:
    """The chunked SSD scan. Returns y (batch, L, nheads, headdim), fp32.

    L need not be a multiple of ``chunk_size``: the tail is padded with dt = 0 (no decay, no
    input), which leaves the state and the valid outputs unchanged.
    """
    x, dt, A, B, C, D = _fp32(x, dt, A, B, C, D)
    batch, L, nheads, headdim = x.shape
    Q = chunk_size
    pad = (-L) % Q
    nc = (L + pad) // Q
    B, C = _heads(B, nheads), _heads(C, nheads)

    def chunks(t):  # (batch, L, ...) -> (batch, nc, Q, ...), zero-padded
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, nc, Q, *t.shape[2:])

    xc, dtc, Bc, Cc = chunks(x), chunks(dt), chunks(B), chunks(C)
    a = (dtc * A).permute(0, 3, 1, 2)                   # (batch, nheads, nc, Q)
    acs = a.cumsum(-1)

    # 1. Within each chunk: y_t = sum_{s<=t} (C_t . B_s) exp(acs_t - acs_s) dt_s x_s.
    decay = torch.exp(segsum(a))                        # (batch, nheads, nc, Q_t, Q_s)
    y_diag = torch.einsum("bcthn,bcshn,bhcts,bcsh,bcshp->bcthp", Cc, Bc, decay, dtc, xc)

    # 2. Each chunk's own contribution to the state at its end.
    to_end = torch.exp(acs[..., -1:] - acs)             # (batch, nheads, nc, Q)
    chunk_states = torch.einsum("bcshn,bhcs,bcsh,bcshp->bchnp", Bc, to_end, dtc, xc)

    # 3. State passing: the state entering chunk c.
    chunk_decay = torch.exp(acs[..., -1])               # (batch, nheads, nc)
    h = x.new_zeros(batch, nheads, B.shape[-1], headdim)
    entering = []
    for c in range(nc):
        entering.append(h)
        h = chunk_decay[:, :, c, None, None] * h + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)             # (batch, nc, nheads, n, p)

    # 4. The entering state read out by C, decayed to each position.
    y_off = torch.einsum("bcthn,bchnp,bhct->bcthp", Cc, entering, torch.exp(acs))

    y = (y_diag + y_off).reshape(batch, nc * Q, nheads, headdim)[:, :L]
    return y + D[:, None] * x
