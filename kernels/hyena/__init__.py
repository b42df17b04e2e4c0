"""Hyena kernels: fused short-conv + gating in Triton, each beside its fp32 reference (``naive``).

- ``hyena_x_gate``: causal short conv over q, k, v (3d channels) fused with ``q * (k * v)``.
- ``mlp_hyena_x_gate``: the same along the feature axis, one filter per token (MLP Hyena-X).
- ``hyena_y_gate``: ``q * h(k * v)`` with a short inner conv h over d channels.
- ``short_conv``: the featurizer conv on its own; ``hyena_se_gate`` = short_conv + Hyena-Y gate.

Each is a ``graftfx::`` custom op with a Triton backward op, so it traces into torch.compile
graphs; the launchers ``*_fwd``/``*_bwd`` run the Triton kernels directly.
"""
from . import naive
from .common import MAX_TAPS
from .hyena_x import (hyena_x_bwd, hyena_x_fwd, hyena_x_gate, mlp_hyena_x_bwd, mlp_hyena_x_fwd,
                      mlp_hyena_x_gate)
from .hyena_y import hyena_se_gate, hyena_y_bwd, hyena_y_fwd, hyena_y_gate
from .featurize import BACKENDS, causal_conv1d_available, short_conv, short_conv_bwd, short_conv_fwd

__all__ = ["BACKENDS", "MAX_TAPS", "causal_conv1d_available", "hyena_se_gate", "hyena_x_bwd",
           "hyena_x_fwd", "hyena_x_gate", "hyena_y_bwd", "hyena_y_fwd", "hyena_y_gate",
           "mlp_hyena_x_bwd", "mlp_hyena_x_fwd", "mlp_hyena_x_gate", "naive", "short_conv",
           "short_conv_bwd", "short_conv_fwd"]
