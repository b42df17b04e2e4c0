"""MLP pattern: linear -> activation -> linear, and the gated forms (GEGLU, SwiGLU).

Anchored at an activation (gelu, tanh-gelu, silu, relu, mish, and CLIP's quick_gelu
``x * sigmoid(1.702 x)``): its input must come (through reshapes/chunks) from a linear fc1;
its output must reach a linear fc2 either directly or through ``act(a) * b``, where ``b`` comes
from the same fc1 (a fused gate, split by chunk: GEGLU as in diffusers) or from a second
linear of the same input (SwiGLU).

Only token-sequence MLPs count: the input is (B, L, D), and fc1 feeds the activation (and a fused
gate) only. A timestep/class embedding MLP over (B, D) vectors, or an adaLN chain whose first
linear also feeds something else, is a near miss, never a region.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from graftfx.match.cost import count_params, graph_flops
from graftfx.match.grid import region_grid
from graftfx.match.paths import block_index, common_path
from graftfx.match.region import MLP, Region
from graftfx.match.report import Candidate, MatchReport, analysis_cache
from graftfx.match.walk import channel_ids, is_side_effect, params_of, probe, region_nodes, walk_back, walk_forward
from graftfx.trace.ops import SHAPE_OPS, linear_input, linear_params, op_kind
from graftfx.trace.tracer import TracedGraph, module_path, node_dtype, node_shape
from graftfx.registry import register_pattern

ACTIVATIONS = {"gelu", "gelu_tanh", "silu", "relu", "mish"}
QUICK_GELU = 1.702


def _activation(node: fx.Node, gm) -> tuple[str, fx.Node] | None:
    """(activation kind, its input) when ``node`` computes an activation."""
    kind = op_kind(node, gm)
    if kind in ACTIVATIONS:
        return kind, node.args[0]
    if kind == "mul" and node.op == "call_function":
        a, b = (list(node.args) + [None, None])[:2]
        for x, sig in ((a, b), (b, a)):
            if isinstance(x, fx.Node) and isinstance(sig, fx.Node) and op_kind(sig, gm) == "sigmoid":
                inner = sig.args[0]
                if inner is x:
                    return "silu", x
                if isinstance(inner, fx.Node) and op_kind(inner, gm) == "mul" and x in inner.args \
                        and any(isinstance(v, float) and abs(v - QUICK_GELU) < 1e-6 for v in inner.args):
                    return "quick_gelu", x
    return None


def analyse(traced: TracedGraph) -> tuple[list[Region], list[Candidate]]:
    cache = analysis_cache(traced)
    if "mlp" in cache:
        return cache["mlp"]
    gm = traced.gm
    regions, misses = [], []
    for act in traced.graph.nodes:
        found = _activation(act, gm)
        if found is None:
            continue
        act_kind, act_in = found
        path = module_path(act)
        up = walk_back(act_in, gm)
        if up.stop_kind != "linear":
            src = f"{up.stop_kind} ({up.source.name})" if up.source is not None else "a graph input"
            misses.append(Candidate(path, act.name, f"{act_kind} found, but its input comes from {src}, not a linear"))
            continue
        fc1 = up.source
        x = linear_input(fc1, gm)
        x_shape = node_shape(x) or ()
        if len(x_shape) != 3:
            misses.append(Candidate(path, act.name, f"{act_kind} MLP over a {tuple(x_shape)} input, not a (batch, "
                                    "tokens, width) token sequence (a timestep/class embedding)"))
            continue
        gate_chain = mul_node = None
        # Forward: shape ops, then either fc2 directly or a gating multiply.
        fc2, _, stop = walk_forward(act, gm)
        if fc2 is None:
            mul = _gating_mul(act, gm)
            if mul is None:
                misses.append(Candidate(path, act.name, f"{act_kind} after a linear, but no second linear: {stop}"))
                continue
            mul_node, other = mul
            gate_chain = walk_back(other, gm)
            if gate_chain.stop_kind != "linear" or linear_input(gate_chain.source, gm) is not x:
                misses.append(Candidate(path, act.name, f"{act_kind} * {other.name}: the other factor is not a linear of the same input"))
                continue
            fc2, _, stop = walk_forward(mul_node, gm)
            if fc2 is None:
                misses.append(Candidate(path, act.name, f"gated {act_kind} found, but no output linear: {stop}"))
                continue
        if not _feeds_only(fc1, [act] + ([mul_node] if gate_chain is not None else []), x):
            misses.append(Candidate(path, act.name, f"{act_kind} after a linear, but that linear ({fc1.name}) also "
                                    "feeds something other than the activation (an adaLN or embedding chain)"))
            continue
        try:
            region = _build(traced, act, act_kind, up, gate_chain, x, fc2)
        except (ValueError, RuntimeError, TypeError, IndexError) as e:
            misses.append(Candidate(path, act.name, f"MLP found, but its layout could not be read: {e}"))
            continue
        regions.append(region)
    cache["mlp"] = (regions, misses)
    return regions, misses


def _feeds_only(fc1: fx.Node, ends: list[fx.Node], x: fx.Node) -> bool:
    """Every use of fc1's output (through shape ops) lies on its way to ``ends`` (the activation,
    and the gating multiply of a gated MLP)."""
    allowed = set(ends)
    for end in ends:
        stack = [end]
        while stack:
            n = stack.pop()
            for a in n.all_input_nodes:
                if a is not fc1 and a is not x and a not in allowed:
                    allowed.add(a)
                    stack.append(a)
    stack = [fc1]
    while stack:
        n = stack.pop()
        for u in n.users:
            if is_side_effect(u):
                continue
            if u not in allowed:
                return False
            if u not in ends:
                stack.append(u)
    return True


def _gating_mul(act: fx.Node, gm):
    """act (through shape ops) feeds a mul with one other tensor operand: (mul, other)."""
    node = act
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        kind = op_kind(user, gm)
        if kind == "mul":
            tensors = [a for a in user.args[:2] if isinstance(a, fx.Node)]
            if len(tensors) == 2:
                return user, tensors[1] if tensors[0] is node else tensors[0]
            return None
        if kind not in SHAPE_OPS:
            return None
        node = user


def _rows(chain, lin, gm) -> torch.Tensor:
    """Rows of ``lin``'s weight that reach the end of ``chain``, in order."""
    ids = probe(chain.nodes, lin, channel_ids(node_shape(lin)), gm, chain.nodes[-1] if chain.nodes else lin)
    return ids.reshape(-1, ids.shape[-1])[0].long()


def _build(traced, act, act_kind, up, gate_chain, x, fc2) -> Region:
    gm = traced.gm
    fc1 = up.source
    weights: dict[str, torch.Tensor] = {}

    def take(prefix, lin, rows=None):
        _, w, b = linear_params(lin, gm)
        w, b = w.detach(), (b.detach() if b is not None else None)
        if rows is not None and not w.is_meta:
            w = w[rows]
            b = b[rows] if b is not None else None
        elif rows is not None:
            w = w.new_empty((rows.numel(), w.shape[1]))
            b = b.new_empty(rows.numel()) if b is not None else None
        weights[f"{prefix}.weight"] = w
        if b is not None:
            weights[f"{prefix}.bias"] = b

    gated = gate_chain is not None
    if gated:  # 'gate' = through the activation, 'fc1' = the linear branch
        take("gate", fc1, _rows(up, fc1, gm))
        take("fc1", gate_chain.source, _rows(gate_chain, gate_chain.source, gm))
    else:
        take("fc1", fc1, _rows(up, fc1, gm) if up.nodes else None)
    take("fc2", fc2)
    nodes = region_nodes([x], fc2)
    x_shape = node_shape(x)
    tokens = x_shape[1] if x_shape and len(x_shape) == 3 else None
    path = common_path([module_path(n) for n in (fc1, act, fc2)]) or module_path(fc1) or module_path(act)
    return Region(
        path=path, kind=MLP, pattern=MLP, input=x, output=fc2, nodes=nodes, width=x_shape[-1],
        out_width=node_shape(fc2)[-1], tokens=tokens, grid=region_grid(traced, x, tokens),
        hidden=weights["fc1.weight"].shape[0], activation=act_kind, block_index=block_index(path),
        weights=weights, params=count_params(params_of(nodes, gm).values()),
        flops=graph_flops(gm, traced.batch_size, nodes), dtype=node_dtype(x),
        details={"gated": gated, "fused_gate": gated and gate_chain.source is fc1, "anchor": act.name},
    )


def _report(traced: TracedGraph) -> MatchReport:
    regions, misses = analyse(traced)
    return MatchReport(MLP, list(regions), list(misses))


register_pattern(MLP, _report, "linear -> activation -> linear, or gated act(a)*b (GEGLU, SwiGLU) -> linear")
