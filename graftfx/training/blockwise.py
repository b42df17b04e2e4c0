"""A traced model cut into its blocks, each one ``nn.Module`` that runs its block's nodes.

A traced graph is flat: a block of the original model is no longer a module that is called, so
nothing can wrap it (FSDP2's ``fully_shard`` units, activation checkpointing). ``split_blocks``
cuts the graph at the boundaries of its blocks (runs of nodes whose module path starts with
``<name>.<index>``, as ``blocks.3`` or ``transformer_blocks.17``) and gives back a module that
computes exactly the same thing, its parameters the model's own (shared, not copied):

- ``units``: one ``fx.GraphModule`` per block run; it owns every parameter and module only that
  run uses, under their original names;
- the rest of the graph (embeddings, final layer) calls the units in order; a parameter several
  runs use stays with it, and is passed in.

``BlockSplit.names`` maps each of its parameter names back to the traced model's.
"""
from __future__ import annotations

import copy
import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from graftfx.errors import GraftError
from graftfx.trace.meta import PATH

_BLOCK = re.compile(r"^(.*?[A-Za-z_][A-Za-z0-9_]*\.\d+)(?:\.|$)")


@dataclass
class BlockSplit:
    """What ``split_blocks`` made: the module, its units (by block path) and the names map."""

    module: fx.GraphModule
    units: dict[str, nn.Module]          # unit attribute name -> unit (a Checkpointed when asked)
    blocks: dict[str, str]               # unit attribute name -> block path ("blocks.3")
    names: dict[str, str]                # split's parameter name -> the traced model's


class Checkpointed(nn.Module):
    """``block`` whose activations are recomputed in backward instead of kept."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.block(*args)
        return checkpoint(self.block, *args, use_reentrant=False)


def block_of(node: fx.Node) -> str | None:
    """The block path a node belongs to (``transformer_blocks.3``), or None outside any block."""
    return _key(node.meta.get(PATH, "") or "")


def _key(path: str) -> str | None:
    match = _BLOCK.match(path)
    return match.group(1) if match else None


def split_blocks(gm: fx.GraphModule, *, activation_checkpointing: bool = False) -> BlockSplit:
    """``gm`` cut into block units (see the module docstring). With ``activation_checkpointing``
    each unit recomputes its activations in backward."""
    graph = gm.graph
    order = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    paths = {n.meta.get(PATH, "") or "" for n in order}
    # a block has inner modules: ``t_embedder.mlp.0`` (a Linear of a Sequential) is not one
    deep = {k for k in map(_key, paths) if k and any(p.startswith(k + ".") for p in paths)}
    runs: list[tuple[str, list[fx.Node]]] = []
    for node in order:
        key = block_of(node)
        if key not in deep:
            continue
        if runs and runs[-1][0] == key and _only_skipped_between(runs[-1][1][-1], node):
            runs[-1][1].append(node)
        else:
            runs.append((key, [node]))
    unit_of: dict[fx.Node, int] = {n: i for i, (_, nodes) in enumerate(runs) for n in nodes}
    owner = _owners(graph, unit_of)
    runs = [(key, nodes) for i, (key, nodes) in enumerate(runs) if _owns_state(i, nodes, owner, gm)]
    unit_of = {n: i for i, (_, nodes) in enumerate(runs) for n in nodes}
    owner = _owners(graph, unit_of)
    _check_modules_not_shared(gm, unit_of)

    new = fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    outer_attrs: dict[str, object] = {}
    units: dict[str, nn.Module] = {}
    blocks: dict[str, str] = {}
    built: set[int] = set()
    for node in graph.nodes:
        if node in unit_of:
            i = unit_of[node]
            if i in built:
                continue
            built.add(i)
            name = f"unit{len(units)}"
            unit, inputs, outputs = _unit(gm, runs[i][1], i, owner)
            units[name] = Checkpointed(unit) if activation_checkpointing else unit
            blocks[name] = runs[i][0]
            call = new.call_module(name, tuple(env[x] for x in inputs))
            call.meta[PATH] = runs[i][0]
            for k, out in enumerate(outputs):
                env[out] = new.call_function(operator.getitem, (call, k)) if len(outputs) > 1 else call
            continue
        if node.op == "get_attr":
            if owner.get(node) is not None:
                continue   # lives in its unit
            outer_attrs[node.target] = _fetch(gm, node.target)
        elif node.op == "call_module":
            outer_attrs[node.target] = gm.get_submodule(node.target)
        env[node] = new.node_copy(node, lambda n: env[n])
    module = fx.GraphModule({**outer_attrs, **units}, new, class_name="BlockSplit")
    module.graph.lint()
    ids = {id(p): n for n, p in gm.named_parameters(remove_duplicate=False)}
    names = {n: ids[id(p)] for n, p in module.named_parameters() if id(p) in ids}
    return BlockSplit(module, units, blocks, names)


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _only_skipped_between(a: fx.Node, b: fx.Node) -> bool:
    """Only placeholders / get_attr nodes lie between ``a`` and ``b`` in graph order."""
    n = a.next
    while n is not b:
        if n.op not in ("get_attr", "placeholder"):
            return False
        n = n.next
    return True


def _owners(graph: fx.Graph, unit_of: dict[fx.Node, int]) -> dict[fx.Node, int | None]:
    """get_attr node -> the one unit all its users are in (None: used outside or by several)."""
    owner = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            users = {unit_of.get(u) for u in node.users}
            owner[node] = users.pop() if len(users) == 1 else None
    return owner


def _check_modules_not_shared(gm: fx.GraphModule, unit_of: dict[fx.Node, int]) -> None:
    """A module with parameters called from two units (or a unit and the rest: a module tied
    between blocks) would belong to two FSDP units at once."""
    where: dict[str, set] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and any(True for _ in gm.get_submodule(node.target).parameters()):
            where.setdefault(node.target, set()).add(unit_of.get(node))
    shared = sorted(t for t, units in where.items() if len(units) > 1)
    if shared:
        raise GraftError(f"module {shared[0]} is called from {len(where[shared[0]])} places in different blocks, so "
                         "it cannot belong to one block unit; fix: use --parallel ddp (no block units) for this model")


def _owns_state(i: int, nodes: list[fx.Node], owner: dict, gm: fx.GraphModule) -> bool:
    """A run becomes a unit only when it holds parameters (else its nodes stay outside)."""
    if any(n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).parameters()) for n in nodes):
        return True
    return any(o == i and isinstance(_fetch(gm, g.target), nn.Parameter) for g, o in owner.items())


def _unit(gm: fx.GraphModule, nodes: list[fx.Node], i: int, owner: dict):
    """The GraphModule running ``nodes``; its inputs (outer nodes) and outputs (used outside)."""
    inside = set(nodes)
    outside = [n for n in dict.fromkeys(m for node in nodes for m in node.all_input_nodes) if n not in inside]
    mine = [n for n in outside if n.op == "get_attr" and owner.get(n) == i]
    inputs = [n for n in outside if n not in mine]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for k, n in enumerate(inputs):      # placeholders first, as fx wants
        env[n] = graph.placeholder(f"in{k}_{n.name}")
        env[n].meta = dict(n.meta)
    attrs: dict[str, object] = {}
    for n in mine:
        attrs[n.target] = _fetch(gm, n.target)
        env[n] = graph.node_copy(n)
    for node in nodes:
        if node.op == "call_module":
            attrs[node.target] = gm.get_submodule(node.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[n] for n in outputs))
    unit = fx.GraphModule(attrs, graph, class_name="Block")
    unit.graph.lint()
    return unit, inputs, outputs
