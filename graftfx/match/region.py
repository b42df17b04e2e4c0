"""The record a match returns: one region of a traced graph that a rule may replace."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

# Region kinds the built-in patterns report. User patterns report their own pattern name.
SELF_ATTENTION = "self_attention"
CAUSAL_SELF_ATTENTION = "causal_self_attention"  # token i sees tokens j <= i (LLMs)
CROSS_ATTENTION = "cross_attention"
JOINT_ATTENTION = "joint_attention"  # q/k/v over a concatenation of streams: never spliced as self
MLP = "mlp"

# What a region may carry beyond its input (and context), by the name of the operator feature
# that uses it. An operator declares the features it takes (``Operator.takes``); the splicer
# passes it only those extra inputs.
#   mask: a key-padding (or other input-dependent) mask, SDPA's attn_mask semantics (bool: True
#         attends; float: added to the scores). Required: an operator that does not take masks
#         is refused for the region (it would attend to padding).
#   bias: additive terms between the scores and the softmax (relative-position bias, ALiBi,
#         a shifted-window mask), ``details["bias_steps"]``. Optional: an operator that does not
#         take it is trained without it, and explain says so.
#   rope: rotary tables ``q_cos``/``q_sin``/``k_cos``/``k_sin`` applied to q and k,
#         ``details["rope"]``. Optional, as bias.
REQUIRED_FEATURES = ("mask",)
OPTIONAL_FEATURES = ("bias", "rope")


def feature_of(input_name: str) -> str:
    """The feature an extra input belongs to: ``bias0`` -> bias, ``q_cos`` -> rope, ``mask``,
    ``mask0`` (an input-dependent additive term of an explicit softmax) -> mask."""
    if input_name.startswith("bias"):
        return "bias"
    if input_name.startswith("mask"):
        return "mask"
    if input_name.endswith(("_cos", "_sin")):
        return "rope"
    return input_name


@dataclass(eq=False)
class Region:
    """A matched subgraph: ``input -> nodes -> output`` with everything a replacement needs.

    Shapes are those of the example inputs the graph was traced with. ``weights`` holds the
    original parameters under canonical names, already in a standard layout:

    - attention: ``q.weight``/``q.bias``, ``k.*``, ``v.*`` (rows grouped by head, head ``h``
      at ``h*head_dim:(h+1)*head_dim``), ``out.weight``/``out.bias`` (columns in the same
      head order), optional ``q_norm.*``/``k_norm.*``.
    - mlp: ``fc1.*``, ``fc2.*``; gated forms add ``gate.*`` (the branch through the activation,
      and ``fc1`` is then the linear branch).
    Missing biases are absent keys.
    """

    path: str                      # module path, e.g. "blocks.3.attn"
    kind: str                      # one of the kinds above, or a user pattern's name
    pattern: str                   # the pattern that produced it
    input: fx.Node                 # boundary input, (B, L, D)
    output: fx.Node                # boundary output, (B, L, out_width)
    nodes: tuple[fx.Node, ...]     # what a splice replaces, in graph order
    context: fx.Node | None = None  # cross-attention's key/value source, (B, S, context_width);
                                    # joint attention's second stream (its own q/k/v projections)
    width: int = 0                 # D, input features
    out_width: int = 0
    tokens: int | None = None      # L at the example shape
    grid: tuple[int, int] | None = None  # token grid (H, W) in raster order, when known
    heads: int | None = None
    head_dim: int | None = None
    hidden: int | None = None      # MLP hidden width
    activation: str | None = None  # "gelu_tanh", "gelu", "silu", "relu", ...
    block_index: int | None = None  # the index after "blocks."/"transformer_blocks." etc.
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    params: int = 0                # parameters inside the region
    flops: int = 0                 # matmul-class FLOPs per sample at the example shape
    dtype: torch.dtype = torch.float32
    details: dict[str, Any] = field(default_factory=dict)  # pattern-specific facts
    extra_inputs: dict[str, fx.Node] = field(default_factory=dict)   # name -> node; see feature_of
    extra_outputs: dict[str, fx.Node] = field(default_factory=dict)  # "context": joint's 2nd stream out

    @property
    def features(self) -> tuple[str, ...]:
        """Features of what the region carries (mask, bias, rope), each once, in that order."""
        found = {feature_of(n) for n in self.extra_inputs}
        return tuple(f for f in REQUIRED_FEATURES + OPTIONAL_FEATURES if f in found)

    @property
    def outputs(self) -> tuple[fx.Node, ...]:
        return (self.output, *self.extra_outputs.values())

    @property
    def context_width(self) -> int | None:
        ctx = self.details.get("context_width")
        return int(ctx) if ctx is not None else None

    def summary(self) -> str:
        shape = f"D={self.width}"
        if self.heads:
            shape += f" H={self.heads}"
        if self.hidden:
            shape += f" hidden={self.hidden}"
        if self.tokens:
            shape += f" L={self.tokens}"
        if self.features:
            shape += " +" + "+".join(self.features)
        return f"{self.path} [{self.kind}] {shape}"

    def __repr__(self) -> str:  # nodes and weights are long; keep the record readable
        return f"Region({self.summary()}, params={self.params}, flops={self.flops})"
