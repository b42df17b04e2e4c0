"""The block record: one transformer block of a traced graph, read by its residual structure.

A block is a chain of residual stages over one token stream::

    h_0 = x
    h_k = h_{k-1} + u_k        u_k = gate_k * branch_k(modulate(norm(h_{k-1}), cond))   k = 1..K
    y   = h_K

(graftfx's DiT and diffusers' DiT: K = 2, attention then MLP; PixArt's ``BasicTransformerBlock``:
K = 3, self-attention, cross-attention, MLP.) ``Branch`` names one stage: the region its core is
(an attention or MLP ``Region``), the stream it reads (``stream``), where its input leaves the
stream (``entry``: the first node on the way from the stream to the core, a norm or the core's
own input), the update it adds (``update``) and the residual add (``residual``). ``BlockRegion``
is a ``Region`` of kind ``block`` (input x, output y, every node of the block, conditioning
inputs as named ``extra_inputs``) with its branches, so a structural rewrite can rewire them.

``block_members`` computes a block's node set on any graph (the traced one, or a grafted copy
whose regions are already call_module operators), so matching and rewriting agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from graftfx.trace.tracer import module_path

from .region import Region

BLOCK = "block"
BLOCK_PAIR = "block_pair"          # two blocks rewritten into one parallel block
MERGED_BLOCK = "merged_block"      # two blocks merged into one block (weights averaged)


@dataclass(eq=False)
class Branch:
    """One residual stage of a block: ``residual = stream + update``."""

    kind: str                       # the core's region kind: self_attention, cross_attention, mlp, ...
    region: Region | None           # the attention/MLP region the branch computes
    stream: fx.Node                 # the residual stream the stage reads (x, or the previous residual)
    entry: fx.Node                  # where the branch input leaves the stream (norm, or the core input)
    update: fx.Node                 # what the stage adds: gate * branch(...)
    residual: fx.Node               # the residual add, stream + update

    def __repr__(self) -> str:
        return f"Branch({self.kind}: {self.stream.name} + {self.update.name} -> {self.residual.name})"


@dataclass(eq=False)
class BlockRegion(Region):
    """A transformer block: ``input`` x, ``output`` y (the last residual add), its ``branches``
    in order, and its conditioning (adaLN's c, a timestep embedding, cross-attention context) as
    named ``extra_inputs``. ``details["scalars"]`` lists integer inputs (export's batch size
    ``sym_size``) a rewrite recomputes from x instead of passing."""

    branches: tuple[Branch, ...] = field(default_factory=tuple)

    @property
    def prefix(self) -> str:
        return self.path

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(b.kind for b in self.branches)

    def __repr__(self) -> str:
        return f"BlockRegion({self.path}: {' -> '.join(self.stages)}, extra={list(self.extra_inputs)})"


def _ancestors(nodes, stop: set) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen and a not in stop:
                seen.add(a)
                stack.append(a)
    return seen


def _depends_on(node_set: set, source: fx.Node, order: dict) -> set[fx.Node]:
    """Members of ``node_set`` that depend on ``source``."""
    out: set[fx.Node] = set()
    for n in sorted(node_set, key=order.__getitem__):
        if any(a is source or a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def block_members(x: fx.Node, y: fx.Node, prefix: str) -> tuple[list[fx.Node], list[fx.Node]]:
    """(the block's nodes in graph order, the nodes outside it that they read).

    Members: ``y`` and its ancestors that are not ancestors of ``x`` (nor ``x``) and either
    depend on ``x`` or sit under the block's module path ``prefix`` (the adaLN chain computed
    from c, a per-block timestep embedder), plus the export checks hanging off them. Outside
    reads: everything else a member reads, ``x`` first."""
    graph = y.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    before_x = _ancestors([x], set()) | {x}
    up = (_ancestors([y], before_x) | {y}) - before_x
    dep = _depends_on(up, x, order)
    members = {n for n in up if n in dep or under(module_path(n), prefix)}
    # get_attr parameters read only by members belong to the block, wherever their path points
    members |= {a for n in members for a in n.all_input_nodes
                if a.op == "get_attr" and all(u in members for u in a.users)}
    members |= {u for n in members for u in n.users if not u.users and "assert" in str(u.target)}
    outside: dict[fx.Node, None] = {x: None}
    for n in sorted(members, key=order.__getitem__):
        for a in n.all_input_nodes:
            if a not in members:
                outside.setdefault(a, None)
    return sorted(members, key=order.__getitem__), list(outside)
