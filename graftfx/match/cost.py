"""Parameter and FLOP counts from a traced graph's recorded shapes (matmul-class FLOPs only:
linear, matmul, attention products, convolutions; elementwise ops are not counted)."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from graftfx.trace.ops import attr_value, linear_params, op_kind
from graftfx.trace.tracer import node_shape


def node_flops(node: fx.Node, gm: fx.GraphModule) -> int:
    """FLOPs of one node at the example shapes (whole batch)."""
    kind = op_kind(node, gm)
    out = node_shape(node)
    if kind in ("linear", "addmm") and out:
        _, w, _ = linear_params(node, gm)
        return 2 * math.prod(out[:-1]) * int(w.shape[1]) * int(w.shape[0])
    if kind in ("matmul", "baddbmm") and out:
        a = node.args[1] if kind == "baddbmm" else node.args[0]
        a_shape = node_shape(a) if isinstance(a, fx.Node) else None
        if a_shape:
            return 2 * math.prod(out) * int(a_shape[-1])
    if kind in ("sdpa", "sdpa_tuple"):
        q, k = (node_shape(a) if isinstance(a, fx.Node) else None for a in node.args[:2])
        if q and k:  # QK^T and PV: 2 * (2 * ... * L * S * Dh)
            return 4 * math.prod(q[:-1]) * int(k[-2]) * int(q[-1])
    if kind in ("conv2d", "conv1d") and out:
        if node.op == "call_module":
            w = gm.get_submodule(node.target).weight
        else:
            w = attr_value(node.args[1], gm)
        if w is not None:
            return 2 * math.prod(out) * math.prod(w.shape[1:])
    return 0


def graph_flops(gm: fx.GraphModule, batch: int, nodes=None) -> int:
    """Per-sample FLOPs of ``nodes`` (default: the whole graph)."""
    nodes = gm.graph.nodes if nodes is None else nodes
    return sum(node_flops(n, gm) for n in nodes) // max(batch, 1)


def module_flops(module: torch.nn.Module, tokens: int, width: int, dtype=torch.float32) -> int:
    """Per-sample FLOPs of a replacement operator: its own ``flops(tokens)`` when it has one,
    else torch's FLOP counter on a meta input of shape (1, tokens, width)."""
    if hasattr(module, "flops"):
        return int(module.flops(tokens))
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.empty(1, tokens, width, device="meta", dtype=dtype)
    meta = _meta_copy(module)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(x)
    return int(counter.get_total_flops())


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    if all(p.is_meta for p in module.parameters()):
        return module
    clone = copy.deepcopy(module)
    return clone.to("meta")


def count_params(tensors) -> int:
    """Elements of ``tensors`` (or of a module's parameters), each tensor counted once."""
    if isinstance(tensors, torch.nn.Module):
        tensors = tensors.parameters()
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel()
    return total
