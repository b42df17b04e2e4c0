"""Attention patterns: self-attention and cross-attention.

An attention core is ``scaled_dot_product_attention(q, k, v)`` or the explicit
``softmax(q @ k^T * scale) @ v``. From the core, q, k and v are followed back through
reshapes/permutes (and optional q/k norms and scalar scaling) to their projections, and the
output forward to the output projection. The projections' inputs decide the kind:
q, k, v from one tensor -> self-attention; k, v from another tensor -> cross-attention;
anything else (e.g. q over a concatenation of image and text tokens) -> joint attention,
which a self-attention rule never touches.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from graftfx.match.cost import count_params, graph_flops
from graftfx.match.grid import region_grid
from graftfx.match.paths import block_index, common_path
from graftfx.match.region import CROSS_ATTENTION, JOINT_ATTENTION, SELF_ATTENTION, Region
from graftfx.match.report import Candidate, MatchReport, analysis_cache
from graftfx.match.walk import (first_tensor_arg, scalar_operand, channel_ids, params_of, probe,
                                region_nodes, walk_back, walk_forward)
from graftfx.trace.ops import SHAPE_OPS, attr_value, linear_input, linear_params, op_kind
from graftfx.trace.tracer import TracedGraph, module_path, node_dtype, node_shape
from graftfx.registry import register_pattern


def _cores(traced: TracedGraph):
    """(core node, q, k, v, output node, scale or None, candidate-failure or None)."""
    gm = traced.gm
    for node in traced.graph.nodes:
        kind = op_kind(node, gm)
        if kind in ("sdpa", "sdpa_tuple"):
            q, k, v = node.args[:3]
            out = node
            if kind == "sdpa_tuple":
                firsts = [u for u in node.users if op_kind(u) == "getitem" and u.args[1] == 0]
                out = firsts[0] if firsts else node
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)
            why = None
            if isinstance(mask, fx.Node):
                why = "attention takes a mask input (masked attention is not replaced)"
            elif causal is True:
                why = "attention is causal (is_causal=True)"
            yield node, q, k, v, out, node.kwargs.get("scale"), why
        elif kind == "softmax":
            found = _explicit_core(node, gm)
            if found is not None:
                yield found


def _explicit_core(softmax: fx.Node, gm):
    """softmax(scores) where scores = (q @ k^T) [* or / scalar], followed by @ v."""
    scale = 1.0
    scores = first_tensor_arg(softmax)
    while scores is not None and op_kind(scores, gm) in ("mul", "div") and scalar_operand(scores) is not None:
        s = scalar_operand(scores)
        scale *= s if op_kind(scores, gm) == "mul" else 1.0 / s
        scores = first_tensor_arg(scores)
    if scores is None:
        return None
    skind = op_kind(scores, gm)
    if skind == "matmul":
        q, kt = scores.args[:2]
    elif skind == "baddbmm":
        q, kt = scores.args[1:3]
        scale *= float(scores.kwargs.get("alpha", 1.0))
    else:
        return None
    k, transposed = _untranspose(kt, gm)
    # P @ v: follow softmax through dropout/casts to a matmul that uses it as the left operand.
    node = softmax
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        ukind = op_kind(user, gm)
        if ukind == "matmul" and user.args[0] is node:
            v = user.args[1]
            why = None if transposed else "scores are q @ k without a transpose of k"
            return scores, q, k, v, user, scale, why
        if ukind not in SHAPE_OPS:
            return None
        node = user


def _untranspose(kt: fx.Node, gm):
    """k from k^T: the transpose's input, else the node itself (flag False)."""
    if op_kind(kt, gm) == "transpose":
        return kt.args[0], True
    return kt, False


def analyse(traced: TracedGraph) -> tuple[list[Region], list[Candidate]]:
    """All attention regions of ``traced`` (every kind) and the cores that did not make one."""
    cache = analysis_cache(traced)
    if "attention" in cache:
        return cache["attention"]
    gm = traced.gm
    regions: list[Region] = []
    misses: list[Candidate] = []
    for core, q, k, v, out, scale, why in _cores(traced):
        path = module_path(core)
        if why:
            misses.append(Candidate(path, core.name, why))
            continue
        chains = {name: walk_back(arg, gm, allow_norm=name != "v") for name, arg in (("q", q), ("k", k), ("v", v))}
        bad = [(name, c) for name, c in chains.items() if c.stop_kind != "linear"]
        if bad:
            name, c = bad[0]
            src = f"{c.stop_kind} ({c.source.name})" if c.source is not None else "a graph input"
            misses.append(Candidate(path, core.name, f"attention core found, but {name} comes from {src}, not a projection"))
            continue
        proj_out, crossed, stop = walk_forward(out, gm)
        if proj_out is None:
            misses.append(Candidate(path, core.name, f"attention core found, but no output projection: {stop}"))
            continue
        x_q, x_k, x_v = (linear_input(chains[n].source, gm) for n in "qkv")
        if x_k is not x_v:
            misses.append(Candidate(path, core.name, "attention core found, but k and v come from different inputs"))
            continue
        if x_q is x_k:
            kind, inputs, context = SELF_ATTENTION, [x_q], None
        else:
            kind, inputs, context = CROSS_ATTENTION, [x_q, x_k], x_k
        try:
            region = _build(traced, kind, core, chains, out, crossed, proj_out, inputs, context, scale)
        except (ValueError, RuntimeError, TypeError, IndexError) as e:
            misses.append(Candidate(path, core.name, f"attention core found, but its layout could not be read: {e}"))
            continue
        if _joint(region, traced):
            region.kind = JOINT_ATTENTION
        regions.append(region)
    cache["attention"] = (regions, misses)
    return regions, misses


def _joint(region: Region, traced: TracedGraph) -> bool:
    """The tokens attended over are a concatenation of streams (e.g. text + image tokens)."""
    node = region.input
    while op_kind(node, traced.gm) in SHAPE_OPS and first_tensor_arg(node) is not None:
        node = first_tensor_arg(node)
    if op_kind(node, traced.gm) != "cat":
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(node_shape(node) or ())
    return rank >= 3 and dim % rank == rank - 2  # concatenated along the token axis


def _build(traced, kind, core, chains, out, crossed, proj_out, inputs, context, scale) -> Region:
    gm = traced.gm
    q_lin, k_lin, v_lin = (chains[n].source for n in "qkv")
    x = inputs[0]
    x_shape = node_shape(x)
    weights: dict[str, torch.Tensor] = {}
    heads = head_dim = tokens = None
    # Which rows of each projection feed head h, dim d of q/k/v.
    for name, lin in (("q", q_lin), ("k", k_lin), ("v", v_lin)):
        chain = chains[name]
        _, w, b = linear_params(lin, gm)
        ids = probe(chain.nodes, lin, channel_ids(node_shape(lin)), gm, _core_arg(core, name, chains))
        if ids.dim() == 3:  # (B*H, L, Dh): heads folded into the batch
            batch = node_shape(x)[0]
            ids = ids.reshape(batch, ids.shape[0] // batch, ids.shape[1], ids.shape[2])
        h, length, dh = ids.shape[1], ids.shape[2], ids.shape[3]
        rows = ids[0, :, 0, :].reshape(-1).long()  # (H*Dh,) row index per (head, dim)
        if not torch.equal(ids[0, :, -1, :].reshape(-1).long(), rows):
            raise ValueError(f"{name} rows differ between tokens")
        weights[f"{name}.weight"] = w.detach()[rows] if not w.is_meta else w.detach().new_empty((rows.numel(), w.shape[1]))
        if b is not None:
            weights[f"{name}.bias"] = b.detach()[rows] if not b.is_meta else b.detach().new_empty(rows.numel())
        if chain.norm is not None:
            weights.update({f"{name}_norm.{k}": t.detach() for k, t in _norm_params(chain.norm, gm).items()})
        if name == "q":
            heads, head_dim, tokens = h, dh, length
    # Which input column of the output projection carries head h, dim d.
    out_shape = node_shape(out)
    seed = _head_ids(out_shape, heads, head_dim)
    cols = probe(crossed, out, seed, gm, proj_out.args[0] if proj_out.op != "call_module" else proj_out.args[0])
    cols = cols[0, 0].long()  # proj input channel c holds head-dim id cols[c]
    _, w_o, b_o = linear_params(proj_out, gm)
    order = torch.empty_like(cols)
    order[cols] = torch.arange(cols.numel())
    weights["out.weight"] = w_o.detach()[:, order] if not w_o.is_meta else w_o.detach()
    if b_o is not None:
        weights["out.bias"] = b_o.detach()
    total_scale = chains["q"].scale * chains["k"].scale * (scale if scale is not None else 1.0 / math.sqrt(head_dim))
    nodes = region_nodes(inputs, proj_out)
    path = common_path([module_path(n) for n in (q_lin, k_lin, v_lin, proj_out, core)])
    details = {
        "scale": total_scale, "qkv_fused": q_lin is k_lin is v_lin, "core": core.name,
        "explicit_softmax": op_kind(core, gm) not in ("sdpa", "sdpa_tuple"),
        # a q/k norm crossed on the way: {"kind", "shape" (normalised size: head dim or width), "eps"}
        "q_norm": _norm_facts(chains["q"].norm, gm), "k_norm": _norm_facts(chains["k"].norm, gm),
    }
    if context is not None:
        details["context_width"] = node_shape(context)[-1]
    return Region(
        path=path, kind=kind, pattern=kind, input=x, output=proj_out, nodes=nodes, context=context,
        width=x_shape[-1], out_width=node_shape(proj_out)[-1], tokens=tokens,
        grid=region_grid(traced.grid, tokens), heads=heads, head_dim=head_dim, block_index=block_index(path),
        weights=weights, params=count_params(params_of(nodes, gm).values()),
        flops=graph_flops(gm, traced.batch_size, nodes), dtype=node_dtype(x), details=details,
    )


def _core_arg(core, name, chains):
    return chains[name].nodes[-1] if chains[name].nodes else chains[name].source


def _head_ids(shape, heads, head_dim) -> torch.Tensor:
    """A core-output-shaped tensor whose value at head h, dim d is h*head_dim + d."""
    ids = torch.arange(heads * head_dim, dtype=torch.int32).reshape(heads, 1, head_dim)
    if len(shape) == 4:  # (B, H, L, Dh)
        return ids.expand(shape[0], heads, shape[2], head_dim)
    batch = shape[0] // heads  # (B*H, L, Dh)
    return ids.expand(batch, heads, shape[1], head_dim).reshape(shape).clone()


def _norm_facts(norm: fx.Node | None, gm) -> dict | None:
    """What a copy of the norm needs: its kind, the size it normalises over, its eps (None for an
    RMSNorm without one: torch then uses the dtype's machine epsilon)."""
    if norm is None:
        return None
    kind = op_kind(norm, gm)
    if norm.op == "call_module":
        mod = gm.get_submodule(norm.target)
        shape, eps = tuple(mod.normalized_shape), getattr(mod, "eps", None)
    else:
        shape = norm.args[1] if len(norm.args) > 1 else norm.kwargs.get("normalized_shape")
        shape = tuple(shape) if isinstance(shape, (list, tuple)) else (shape,)
        idx = 3 if kind == "rms_norm" else 4
        eps = norm.args[idx] if len(norm.args) > idx else norm.kwargs.get("eps", None if kind == "rms_norm" else 1e-5)
    if len(shape) != 1 or not isinstance(shape[0], int):
        raise ValueError(f"the q/k norm {norm.name} normalises over {shape}, not one axis")
    return {"kind": kind, "shape": int(shape[0]), "eps": float(eps) if isinstance(eps, (int, float)) else None}


def _norm_params(norm: fx.Node, gm) -> dict[str, torch.Tensor]:
    if norm.op == "call_module":
        return dict(gm.get_submodule(norm.target).named_parameters())
    out = {}
    for key, idx in (("weight", 2), ("bias", 3)):
        value = attr_value(norm.args[idx] if len(norm.args) > idx else None, gm)
        if value is not None:
            out[key] = value
    return out










def _report(kind: str):
    def matcher(traced: TracedGraph) -> MatchReport:
        regions, misses = analyse(traced)
        chosen = [r for r in regions if r.kind == kind]
        others = [Candidate(r.path, r.details["core"], _why_not(r, kind)) for r in regions if r.kind != kind]
        return MatchReport(kind, chosen, misses + others)

    return matcher


def _why_not(region: Region, wanted: str) -> str:
    if region.kind == CROSS_ATTENTION:
        return "softmax/attention found, but q and k come from different inputs (cross-attention)"
    if region.kind == JOINT_ATTENTION:
        return "attention found, but q/k/v span a concatenation of token streams (joint attention)"
    return f"attention found, but it is {region.kind}, not {wanted}"


register_pattern(SELF_ATTENTION, _report(SELF_ATTENTION),
                 "q, k, v projected from one input; SDPA or softmax(QK^T*s)V; output projection")
register_pattern(CROSS_ATTENTION, _report(CROSS_ATTENTION),
                 "q from the tokens, k and v from a second input (e.g. text); output projection")
