"""MLP with expansion ratio r (the paper tries r = 3 and 6 against the original 4).

``init="copy"`` (the default when the hidden width is unchanged) takes the original weights,
so an MLP self-graft reproduces the original exactly; other ratios start fresh.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from graftfx.rewrites.registry import register_operator

ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu,
    "relu": F.relu, "mish": F.mish,
}
INITS = ("auto", "copy", "fresh")


@dataclass
class MLPConfig:
    ratio: float | None = None      # hidden = ratio * width; None keeps the original hidden width
    activation: str | None = None   # default: the original's
    init: str = "auto"              # copy when the hidden width is unchanged, else fresh

    def __post_init__(self):
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and self.ratio > 0):
            raise ValueError(f"ratio must be a positive number, got {self.ratio!r}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


@register_operator("mlp", config=MLPConfig, kinds=("mlp",), loss="l2",
                   description="MLP with expansion ratio r (plain or gated), copied or fresh")
class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = "gelu_tanh", *, out_dim: int | None = None,
                 gated: bool = False):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden) if gated else None
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    @classmethod
    def from_region(cls, region, **options):
        cfg = MLPConfig(**options)
        hidden = region.hidden if cfg.ratio is None else int(round(cfg.ratio * region.width))
        activation = cfg.activation or region.activation or "gelu_tanh"
        gated = bool(region.details.get("gated"))
        copy = cfg.init == "copy" or (cfg.init == "auto" and hidden == region.hidden and activation == region.activation)
        if copy and hidden != region.hidden:
            raise ValueError(f"init='copy' needs the original hidden width {region.hidden}, got {hidden}")
        mod = cls(region.width, hidden, activation, out_dim=region.out_width, gated=gated)
        if copy:
            with torch.no_grad():
                for name in ("fc1", "fc2", "gate"):
                    layer = getattr(mod, name)
                    if layer is None:
                        continue
                    layer.weight.copy_(region.weights[f"{name}.weight"])
                    if f"{name}.bias" in region.weights:
                        layer.bias.copy_(region.weights[f"{name}.bias"])
                    else:
                        layer.bias.zero_()
        return mod

    def forward(self, x):
        act = ACTIVATIONS[self.activation]
        h = act(self.gate(x)) * self.fc1(x) if self.gate is not None else act(self.fc1(x))  # (B, L, hidden)
        return self.fc2(h)  # (B, L, D)

    def flops(self, tokens: int) -> int:
        n = 3 if self.gate is not None else 2
        return 2 * tokens * self.fc1.in_features * self.fc1.out_features * n
