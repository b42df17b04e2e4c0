"""MLP with expansion ratio r (the paper tries r = 3 and 6 against the original 4).

``init="copy"`` (the default when the hidden width is unchanged) takes the original weights,
so an MLP self-graft reproduces the original exactly; other ratios start fresh. Gated originals
(GEGLU, SwiGLU: ``Region.details["gated"]``) keep their gate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from graftfx.operator import Operator
from graftfx.options import check_choice, check_number
from graftfx.registry import register_operator

ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu,
    "relu": F.relu, "mish": F.mish, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),   # CLIP
}
MLP_INITS = ("auto", "copy", "fresh")     # auto: copy when the hidden width and activation are unchanged


@dataclass
class MLPConfig:
    ratio: float | None = None      # hidden = ratio * width; None keeps the original hidden width
    activation: str | None = None   # default: the original's
    init: str = "auto"              # copy when the hidden width is unchanged, else fresh

    def __post_init__(self):
        check_number("ratio", self.ratio, positive=True, optional=True)
        check_choice("activation", self.activation, tuple(ACTIVATIONS), optional=True)
        check_choice("init", self.init, MLP_INITS)


@register_operator("mlp", config=MLPConfig, kinds=("mlp",), loss="l2",
                   description="MLP with expansion ratio r (plain or gated), copied or fresh")
class MLP(Operator):
    bench_options = ({"ratio": 3}, {"ratio": 6})      # the paper's widths (r = 4 is the original)

    def __init__(self, dim: int, hidden: int, config: MLPConfig, activation: str = "gelu_tanh", *,
                 out_dim: int | None = None, gated: bool = False):
        super().__init__()
        self.config, self.activation = config, activation
        self.fc1 = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden) if gated else None
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    @classmethod
    def from_region(cls, region, config):
        hidden = region.hidden if config.ratio is None else int(round(config.ratio * region.width))
        if not hidden:
            raise ValueError("the region records no hidden width; set the ratio option")
        activation = config.activation or region.activation or "gelu_tanh"
        if activation not in ACTIVATIONS:
            raise ValueError(f"the original activation {activation!r} is not one mlp has; set the activation "
                             f"option to one of {', '.join(ACTIVATIONS)}")
        same = hidden == region.hidden and activation == region.activation
        copy = config.init == "copy" or (config.init == "auto" and same)
        if copy and hidden != region.hidden:
            raise ValueError(f"init='copy' needs the original hidden width {region.hidden}, got {hidden}; "
                             f"drop ratio or use init='fresh'")
        mod = cls(region.width, hidden, config, activation, out_dim=region.out_width or None,
                  gated=bool(region.details.get("gated")))
        if copy:
            mod.copy_from(region)
        return mod

    @torch.no_grad()
    def copy_from(self, region) -> None:
        for name in ("fc1", "fc2", "gate"):
            layer = getattr(self, name)
            if layer is None:
                continue
            if f"{name}.weight" not in region.weights:
                raise ValueError(f"init='copy' needs the original {name}.weight; use init='fresh'")
            layer.weight.copy_(region.weights[f"{name}.weight"])
            bias = region.weights.get(f"{name}.bias")
            layer.bias.copy_(bias) if bias is not None else layer.bias.zero_()

    def forward(self, x):
        act = ACTIVATIONS[self.activation]
        h = act(self.gate(x)) * self.fc1(x) if self.gate is not None else act(self.fc1(x))  # (B, L, hidden)
        return self.fc2(h)  # (B, L, D)

    def flops(self, tokens: int) -> int:
        d, h = self.fc1.in_features, self.fc1.out_features
        return 2 * tokens * h * (d * (2 if self.gate is not None else 1) + self.fc2.out_features)
