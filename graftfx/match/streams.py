"""What a graph says about a token stream: where its tokens came from, and which values a node
depends on.

A token stream is a (B, L, ...) tensor. Walking back from a node along operands of the same
(B, L) leading shape (through norms, modulations, projections, residual adds) ends at the
stream's *origins*: where the L tokens were formed (a 4-D feature map flattened into tokens:
the token grid), concatenated (``cat`` along the token axis: joint streams when two or more
operands are streams of the model's inputs), or read (a graph input, a parameter).

``depends_on_input`` says whether a node's *values* depend on a graph input (shape-only uses,
``sym_size`` and the like, do not count): a mask built from ``arange`` and sizes does not, a
padding mask built from an ``attention_mask`` input does. ``static_values`` evaluates nodes once
at the example inputs (for a mask that depends on no input, its value everywhere).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graftfx.trace.ops import op_kind, tensor_args
from graftfx.trace.tracer import SHAPE, TracedGraph, node_shape

from .report import analysis_cache

# Ops whose output depends on their input's shape (or dtype/device) only, never its values.
SHAPE_ONLY = {"size", "sym_size", "new_ones", "new_zeros", "new_empty", "new_full", "zeros_like", "ones_like",
              "empty_like", "sym_numel", "numel", "dim", "sym_stride"}
# Ops that move tokens without mixing them (the token axis survives).
_TOKEN_PRESERVING_RESHAPES = {"view", "reshape", "flatten", "unflatten", "transpose", "permute"}


@dataclass
class StreamOrigin:
    """Where the tokens of a stream come from (see the module notes)."""

    grids: set = field(default_factory=set)        # (H, W) of 4-D maps flattened into these tokens
    joints: list = field(default_factory=list)     # cat nodes joining two or more input streams
    segments: list = field(default_factory=list)   # per joint: token counts of its operands, in order


def _kind(node, gm):
    k = op_kind(node, gm)
    if k in ("sym_size", "size") or (node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr"):
        return "size"
    return k


def depends_on_input(traced: TracedGraph, node: fx.Node) -> bool:
    """True when ``node``'s values depend on a graph input's values (placeholders other than
    parameters and buffers)."""
    cache = analysis_cache(traced).setdefault("depends_on_input", {})
    gm = traced.gm
    stack = [node]
    order = []
    while stack:                                      # iterative post-order with memo
        n = stack.pop()
        if n in cache:
            continue
        order.append(n)
        if _kind(n, gm) in SHAPE_ONLY or n.op == "get_attr":
            continue
        stack.extend(a for a in tensor_args(n) if a not in cache)
    for n in reversed(order):
        if n in cache:
            continue
        kind = _kind(n, gm)
        if n.op == "placeholder":
            cache[n] = _is_data_input(traced, n)
        elif kind in SHAPE_ONLY or n.op == "get_attr":
            cache[n] = False
        else:
            cache[n] = any(cache.get(a, False) for a in tensor_args(n))
    return cache[node]


def _is_data_input(traced: TracedGraph, node: fx.Node) -> bool:
    """A placeholder carries data when the example inputs gave it a tensor (``ep.module()`` and FX
    keep parameters as attributes, so placeholders are the user's inputs)."""
    return isinstance(node.meta.get(SHAPE), tuple) or "graftfx_shapes" in node.meta


def token_axis_cat(node: fx.Node, gm) -> int | None:
    """The token axis a rank-3 (B, L, D) ``cat`` joins along (1), else None."""
    if op_kind(node, gm) != "cat":
        return None
    rank = len(node_shape(node) or ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if rank == 3 and dim % rank == 1:
        return 1
    return None


def stream_origin(traced: TracedGraph, node: fx.Node) -> StreamOrigin:
    """Origins of the token stream ``node`` (B, L, D) belongs to (see the module notes)."""
    cache = analysis_cache(traced).setdefault("stream_origin", {})
    if node in cache:
        return cache[node]
    gm = traced.gm
    shape = node_shape(node)
    origin = StreamOrigin()
    if not shape or len(shape) < 2:
        cache[node] = origin
        return origin
    lead = shape[:2]
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        kind = op_kind(n, gm)
        n_shape = node_shape(n)
        if token_axis_cat(n, gm) is not None and n_shape and n_shape[:2] == lead:
            parts = [a for a in n.args[0] if isinstance(a, fx.Node)]
            streams = [a for a in parts if depends_on_input(traced, a)]
            if len(streams) >= 2:
                origin.joints.append(n)
                origin.segments.append([(node_shape(a) or (0, 0))[1] for a in parts])
                continue
            stack.extend(streams)                  # one stream plus learned tokens (a class token)
            continue
        if kind in _TOKEN_PRESERVING_RESHAPES:
            src = next(iter(tensor_args(n)), None)
            src_shape = node_shape(src) if src is not None else None
            if src_shape and src_shape[:2] == lead:
                stack.append(src)
                continue
            grid = _formed_from(gm, src, lead)
            if grid is not None:
                origin.grids.add(grid)
            continue
        for a in tensor_args(n):
            a_shape = node_shape(a)
            if a_shape and len(a_shape) >= 2 and a_shape[:2] == lead:
                stack.append(a)
    cache[node] = origin
    return origin


def _formed_from(gm, node, lead, depth: int = 4) -> tuple[int, int] | None:
    """The grid of the 2-D map that ``node`` (a few reshapes back) flattens into ``lead`` tokens:
    conv -> flatten(2) -> transpose(1, 2), or permute -> reshape, or a Swin window view."""
    for _ in range(depth):
        if node is None:
            return None
        grid = _grid_of(node_shape(node), lead)
        if grid is not None:
            return grid
        if op_kind(node, gm) not in _TOKEN_PRESERVING_RESHAPES | {"contiguous", "clone"}:
            return None
        node = next(iter(tensor_args(node)), None)
    return None


def _grid_of(shape, lead) -> tuple[int, int] | None:
    """(H, W) when ``shape`` is a batch of 2-D maps whose H*W are the ``lead`` tokens:
    (B, C, H, W) or (B, H, W, C)."""
    if not shape or len(shape) != 4 or shape[0] != lead[0]:
        return None
    tokens = lead[1]
    if shape[2] * shape[3] == tokens and shape[1] * shape[2] != tokens:
        return (int(shape[2]), int(shape[3]))
    if shape[1] * shape[2] == tokens and shape[2] * shape[3] != tokens:
        return (int(shape[1]), int(shape[2]))
    return None


def static_values(traced: TracedGraph, nodes: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Values of ``nodes`` at the example inputs (none on the meta device): what an
    input-independent mask always is, and what an input-dependent one is for these inputs.

    Runs only the nodes they need, once per graph (results cached)."""
    cache = analysis_cache(traced).setdefault("static_values", {})
    wanted = [n for n in nodes if n not in cache]
    if wanted and not traced.on_meta:
        needed: set[fx.Node] = set()
        stack = list(wanted)
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            stack.extend(tensor_args(n))
        cache.update(_run_some(traced, needed, wanted))
    return {n: cache[n] for n in nodes if cache.get(n) is not None}


def _run_some(traced: TracedGraph, needed: set, wanted: list) -> dict:
    from graftfx.trace.tracer import flatten_export_inputs

    class Partial(fx.Interpreter):
        def run_node(self, n):
            if n.op != "placeholder" and n not in needed:
                return None
            return super().run_node(n)

    interp = Partial(traced.gm, garbage_collect_values=False)
    env = {}
    try:
        with torch.no_grad():
            if traced.tracer == "export":
                flat = flatten_export_inputs(traced.gm, traced.args, traced.kwargs)
                interp.run(*flat, enable_io_processing=False)
            else:
                interp.run(*traced.args)
        env = interp.env
    except Exception:  # noqa: BLE001 - a value we cannot compute is simply not known
        env = getattr(interp, "env", {})
    return {n: (env.get(n) if isinstance(env.get(n), torch.Tensor) else None) for n in wanted}
