"""Block pattern: a transformer block recognised by its residual structure.

Anchored at the attention and MLP regions the other patterns found: from each region's output
the walk goes forward through what gates an update (a multiply by the adaLN gate, a scalar
rescale, dropout, casts and views) to an ``add`` whose other operand is the residual stream the
region's input was read from (through norm and modulate: ``modulate(norm(h), shift, scale)``, or
directly, as PixArt's cross-attention reads it). Each such add is one residual stage; the stages
of one numbered module (``blocks.3``, ``transformer_blocks.3``) that chain (each reads the
previous one's residual) and run from an attention stage to an MLP stage make a block:
input x = the first stage's stream, output y = the last residual add. What the block reads from
outside besides x is its conditioning: adaLN's c (graftfx's DiT), the timestep embedding
(PixArt's ``adaln_single``), the raw timestep and class labels (diffusers' DiT, whose blocks embed
them themselves), cross-attention context; these are the region's named ``extra_inputs``.
Export's batch-size ``sym_size`` integers are listed in ``details["scalars"]``: a rewrite
recomputes them from x.

The records are ``graftfx.match.block.BlockRegion`` / ``Branch``. Near misses name the
condition a stage or block failed.
"""
from __future__ import annotations

import torch.fx as fx

from graftfx.match.block import BLOCK, BlockRegion, Branch, block_members
from graftfx.match.cost import count_params, graph_flops
from graftfx.match.grid import region_grid
from graftfx.match.paths import block_index, block_prefix
from graftfx.match.region import CAUSAL_SELF_ATTENTION, CROSS_ATTENTION, MLP, SELF_ATTENTION
from graftfx.match.report import Candidate, MatchReport, analysis_cache
from graftfx.match.walk import is_side_effect, params_of, scalar_operand
from graftfx.registry import register_pattern
from graftfx.trace.ops import SHAPE_OPS, op_kind
from graftfx.trace.tracer import TracedGraph, node_dtype, node_shape

from . import attention as _attention
from . import mlp as _mlp

_PASS = SHAPE_OPS | {"to", "dropout", "alias", "contiguous", "clone"}
_FIRST = (SELF_ATTENTION, CAUSAL_SELF_ATTENTION)


def _residual(region, gm):
    """(update, residual add, stream) after ``region``'s output, or a reason string."""
    node = region.output
    for _ in range(16):
        users = [u for u in node.users if not is_side_effect(u)]
        if len(users) != 1:
            return f"its output {node.name} has {len(users)} users, not one residual add"
        user = users[0]
        kind = op_kind(user, gm)
        tensors = [a for a in user.args[:2] if isinstance(a, fx.Node)]
        if kind == "add" and len(tensors) == 2:
            other = tensors[1] if tensors[0] is node else tensors[0]
            return node, user, other
        if kind in _PASS or (kind in ("mul", "div") and (scalar_operand(user) is not None or len(tensors) == 2)):
            node = user
            continue
        return f"its output flows into {kind} ({user.name}), not a gate and a residual add"
    return "no residual add within 16 nodes of its output"


def _reads_from(stream: fx.Node, target: fx.Node, limit: int = 4000) -> fx.Node | None:
    """The user of ``stream`` on the way to ``target`` (``target`` itself when it is the stream's
    direct reader), or None when ``target`` does not depend on ``stream``."""
    if target is stream:
        return target
    seen, stack, path_users = set(), [target], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a is stream:
                path_users.add(n)
            elif a not in seen:
                seen.add(a)
                stack.append(a)
    if not path_users:
        return None
    order = {n: i for i, n in enumerate(stream.graph.nodes)}
    return min(path_users, key=order.__getitem__)


def analyse(traced: TracedGraph):
    cache = analysis_cache(traced)
    if "blocks" in cache:
        return cache["blocks"]
    gm = traced.gm
    attn, _ = _attention.analyse(traced)
    mlps, _ = _mlp.analyse(traced)
    misses: list[Candidate] = []
    stages: dict[str, list[Branch]] = {}
    for region in [r for r in attn if r.kind in (*_FIRST, CROSS_ATTENTION)] + [r for r in mlps if r.tokens]:
        prefix = block_prefix(region.path)
        if not prefix:
            continue
        found = _residual(region, gm)
        if isinstance(found, str):
            misses.append(Candidate(region.path, region.output.name, f"{region.kind} found, but {found}"))
            continue
        update, add, stream = found
        entry = _reads_from(stream, region.input)
        if entry is None:
            misses.append(Candidate(region.path, add.name, f"{region.kind} and a residual add ({add.name}) found, "
                                    f"but the branch input does not come from the stream {stream.name}"))
            continue
        stages.setdefault(prefix, []).append(Branch(region.kind, region, stream, entry, update, add))
    blocks = []
    for prefix, found in stages.items():
        order = {n: i for i, n in enumerate(traced.graph.nodes)}
        found.sort(key=lambda b: order[b.residual])
        reason = _chain_problem(found)
        if reason:
            misses.append(Candidate(prefix, found[0].residual.name, reason))
            continue
        try:
            blocks.append(_build(traced, prefix, found))
        except (ValueError, RuntimeError, TypeError, IndexError, KeyError) as e:
            misses.append(Candidate(prefix, found[0].residual.name, f"block found, but {e}"))
    cache["blocks"] = (blocks, misses)
    return blocks, misses


def _chain_problem(found: list[Branch]) -> str:
    kinds = [b.kind for b in found]
    if kinds[0] not in _FIRST:
        return f"residual stages {kinds} do not start with self-attention"
    if kinds[-1] != MLP:
        return f"residual stages {kinds} do not end with an MLP"
    for prev, cur in zip(found, found[1:]):
        if cur.stream is not prev.residual:
            return (f"the {cur.kind} stage reads {cur.stream.name}, not the previous stage's residual "
                    f"{prev.residual.name}: not one sequential residual chain")
    return ""


def _build(traced: TracedGraph, prefix: str, branches: list[Branch]) -> BlockRegion:
    gm = traced.gm
    x, y = branches[0].stream, branches[-1].residual
    members, outside = block_members(x, y, prefix)
    contexts = {b.region.context for b in branches if b.region is not None and b.region.context is not None}
    extras: dict[str, fx.Node] = {}
    scalars, attrs = [], []
    batch = (node_shape(x) or (None,))[0]
    for n in outside[1:]:
        if n.op == "get_attr":
            attrs.append(n.name)
            continue
        shape = node_shape(n)
        if shape is None:
            kind = op_kind(n, gm)
            src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            if kind == "size" and len(n.args) > 1 and n.args[1] == 0 and src is not None \
                    and (node_shape(src) or (None,))[0] == batch:
                scalars.append(n)
                continue
            raise ValueError(f"it reads {n.name} ({kind}) from outside, which is neither a tensor nor the batch size")
        if n in contexts:
            name = "context" if "context" not in extras else f"context{len(extras)}"
        elif n.op == "placeholder" and n.name.isidentifier() and n.name != "x":
            name = n.name
        else:
            name = "cond" if "cond" not in extras else f"cond{sum(k.startswith('cond') for k in extras)}"
        extras[name] = n
    shape = node_shape(x) or ()
    if len(shape) != 3 or node_shape(y) != shape:
        raise ValueError(f"its input {x.name} {shape} and output {y.name} {node_shape(y)} are not the same (B, L, D)")
    params = params_of(members, gm)
    tokens = shape[1]
    return BlockRegion(
        path=prefix, kind=BLOCK, pattern=BLOCK, input=x, output=y, nodes=tuple(members), width=shape[-1],
        out_width=shape[-1], tokens=tokens, grid=region_grid(traced, x, tokens), block_index=block_index(prefix),
        params=count_params(params.values()), flops=graph_flops(gm, traced.batch_size, members), dtype=node_dtype(x),
        details={"stages": [b.kind for b in branches], "scalars": scalars, "outside_attrs": attrs},
        extra_inputs=extras, branches=tuple(branches))


def _report(traced: TracedGraph) -> MatchReport:
    blocks, misses = analyse(traced)
    return MatchReport(BLOCK, list(blocks), list(misses))


register_pattern(BLOCK, _report, "a transformer block by its residual structure: x + gate*attn(modulate(norm(x))) "
                 "[+ cross-attention] then + gate*mlp(...); conditioning as extra inputs")
