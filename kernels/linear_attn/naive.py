"""fp32 PyTorch reference for non-causal (bidirectional) linear attention.

    o_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)

q, k: (B, H, L, Dk), v: (B, H, L, Dv). Nothing L x L is materialised: the keys are summed into
a (Dk, Dv) state once, so the cost is O(L Dk Dv). ``phi`` is ``elu(x) + 1`` or ``relu(x)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu", "relu")


def phi(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {kind!r}")


def phi_grad(x: torch.Tensor, kind: str) -> torch.Tensor:
    """d phi / d x, elementwise (the same one-sided choice at 0 as autograd)."""
    if kind == "elu":
        return torch.where(x > 0, torch.ones_like(x), torch.exp(x))
    if kind == "relu":
        return (x > 0).to(x.dtype)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {kind!r}")


def linear_attn_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    feature_map: str = "elu", eps: float = 1e-6) -> torch.Tensor:
    """Differentiable fp32 reference; returns the input dtype."""
    fq = phi(q.float(), feature_map)
    fk = phi(k.float(), feature_map)
    kv = torch.einsum("bhld,bhle->bhde", fk, v.float())      # (B, H, Dk, Dv)
    ksum = fk.sum(dim=2)                                      # (B, H, Dk)
    num = torch.einsum("bhld,bhde->bhle", fq, kv)
    den = torch.einsum("bhld,bhd->bhl", fq, ksum) + eps
    return (num / den.unsqueeze(-1)).to(q.dtype)


def linear_attn_bwd_ref(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        feature_map: str = "elu", eps: float = 1e-6):
    """Closed-form gradients (dq, dk, dv) of ``linear_attn_ref`` in fp32, input dtypes out.

    With num = phi(q) KV, den = phi(q) . ksum + eps, o = num / den, delta_i = do_i . o_i:
    dphi(q)_i = (do_i KV^T - delta_i ksum) / den_i,
    dKV = sum_i phi(q_i)^T do_i / den_i,  dksum = -sum_i phi(q_i) delta_i / den_i,
    dphi(k)_j = v_j dKV^T + dksum,  dv_j = phi(k_j) dKV.
    """
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    fq, fk = phi(qf, feature_map), phi(kf, feature_map)
    kv = torch.einsum("bhld,bhle->bhde", fk, vf)
    ksum = fk.sum(dim=2)
    den = torch.einsum("bhld,bhd->bhl", fq, ksum) + eps
    o = torch.einsum("bhld,bhde->bhle", fq, kv) / den.unsqueeze(-1)
    delta = (dof * o).sum(-1)
    dfq = (torch.einsum("bhle,bhde->bhld", dof, kv) - delta.unsqueeze(-1) * ksum.unsqueeze(2))
    dfq = dfq / den.unsqueeze(-1)
    dkv = torch.einsum("bhld,bhle->bhde", fq, dof / den.unsqueeze(-1))
    dksum = -torch.einsum("bhld,bhl->bhd", fq, delta / den)
    dfk = torch.einsum("bhle,bhde->bhld", vf, dkv) + dksum.unsqueeze(2)
    dv = torch.einsum("bhld,bhde->bhle", fk, dkv)
    dq = dfq * phi_grad(qf, feature_map)
    dk = dfk * phi_grad(kf, feature_map)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
