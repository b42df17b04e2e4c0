"""Hyena building blocks in plain fp32 PyTorch: the oracle for the Triton kernels.

``u`` is an in-projection output ``(B, L, 3*d)`` holding q, k, v side by side (channel thirds
in that order). Filters are ``(C, K)``: ``torch.nn.Conv1d`` depthwise weights with the singleton
axis squeezed, applied causally (``padding=K-1``, keep the first L outputs). Every function
returns fp32 and is differentiable with autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _shifted_sum(u: torch.Tensor, weight: torch.Tensor, bias, axis: int) -> torch.Tensor:
    """``y[t] = b + sum_j w[j] * u[t - (K-1) + j]`` along ``axis`` (1: tokens, 2: features), with
    only the terms whose source index exists (no zero padding multiplied by a weight: an infinite
    or NaN tap then reaches only the outputs that really use it). ``weight`` broadcasts against
    ``u`` with the tap axis last."""
    u = u.float()
    n, taps = u.shape[axis], weight.shape[-1]
    y = torch.zeros_like(u) if bias is None else torch.zeros_like(u) + bias.float()
    for j in range(taps):
        shift = taps - 1 - j                      # output t reads source t - shift
        if shift >= n:
            continue
        src = u.narrow(axis, 0, n - shift)
        w = weight.float()[..., j]
        y.narrow(axis, shift, n - shift).add_(src * (w if axis == 2 else w.unsqueeze(0).unsqueeze(0)))
    return y


def causal_conv(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Causal depthwise conv along the token axis: (B, L, C) -> (B, L, C)."""
    return _shifted_sum(u, weight, bias, axis=1)


def hyena_x(u, weight, bias=None):
    """Hyena-X gate: short conv over all 3d channels, then q * (k * v). (B, L, 3d) -> (B, L, d)."""
    q, k, v = causal_conv(u, weight, bias).chunk(3, dim=-1)
    return q * (k * v)


def hyena_y(u, weight, bias=None):
    """Hyena-Y gate: no featurizer, inner conv h over d channels: q * h(k * v)."""
    q, k, v = u.float().chunk(3, dim=-1)
    return q * causal_conv(k * v, weight, bias)


def hyena_se(u, feat_weight, feat_bias, inner_weight, inner_bias):
    """Hyena-SE gate: featurizer conv over 3d channels, then q * h(k * v)."""
    q, k, v = causal_conv(u, feat_weight, feat_bias).chunk(3, dim=-1)
    return q * causal_conv(k * v, inner_weight, inner_bias)


def feature_conv(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Causal conv along the FEATURE axis, one filter per token: (B, L, N), weight (L, K)."""
    b = None if bias is None else bias.float().unsqueeze(-1)          # (L, 1): one per token
    return _shifted_sum(u, weight.unsqueeze(0).unsqueeze(-2), b, axis=2)


def mlp_hyena_x(u, weight, bias=None):
    """MLP Hyena-X gate: feature-axis conv over the whole 3M features, split, q * (k * v).

    (B, L, 3M) -> (B, L, M). The conv runs over the concatenated features, so the first taps
    of k's (v's) features read the last features of q (k), as in the paper's release.
    """
    q, k, v = feature_conv(u, weight, bias).chunk(3, dim=-1)
    return q * (k * v)


# ----------------------------------------------------------------------------- closed-form grads
# The custom ops' reference backward runs below autograd, so it cannot call autograd on the
# forwards above; these are the same gradients written out (tests check them against autograd).
def _depthwise_bwd(dy, x, weight):
    """Grads of a causal depthwise conv in channels-first layout: x, dy (B, C, N); weight (C, K)."""
    taps, n = weight.shape[1], x.shape[-1]
    dy, x, weight = dy.float(), x.float(), weight.float()
    # du[s] = sum_m w[K-1-m] * dy[s+m]: an anti-causal conv with the taps reversed.
    dx = F.conv1d(F.pad(dy, (0, taps - 1)), weight.flip(1).unsqueeze(1), groups=x.shape[1])
    xp = F.pad(x, (taps - 1, 0))
    dw = torch.stack([(dy * xp[..., j:j + n]).sum((0, 2)) for j in range(taps)], dim=1)
    return dx, dw, dy.sum((0, 2))


def causal_conv_bwd(dy, u, weight):
    """(du (B, L, C), dweight (C, K), dbias (C,)) of ``causal_conv`` for cotangent dy (B, L, C)."""
    du, dw, db = _depthwise_bwd(dy.transpose(1, 2), u.transpose(1, 2), weight)
    return du.transpose(1, 2), dw, db


def hyena_x_bwd(dy, u, weight, bias=None):
    q, k, v = causal_conv(u, weight, bias).chunk(3, dim=-1)
    dy = dy.float()
    dc = torch.cat([dy * k * v, dy * q * v, dy * q * k], dim=-1)
    return causal_conv_bwd(dc, u, weight)


def hyena_y_bwd(dy, u, weight, bias=None):
    q, k, v = u.float().chunk(3, dim=-1)
    z = k * v
    dy = dy.float()
    dz, dw, db = causal_conv_bwd(dy * q, z, weight)
    return torch.cat([dy * causal_conv(z, weight, bias), dz * v, dz * k], dim=-1), dw, db


def mlp_hyena_x_bwd(dy, u, weight, bias=None):
    q, k, v = feature_conv(u, weight, bias).chunk(3, dim=-1)
    dy = dy.float()
    dc = torch.cat([dy * k * v, dy * q * v, dy * q * k], dim=-1)
    return _depthwise_bwd(dc, u, weight)
