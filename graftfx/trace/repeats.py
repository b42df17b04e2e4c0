"""Export repeated block stacks once: cut each to two blocks, export, then copy block 1's graph.

``torch.export`` spends its time per traced op, so a 28-block transformer costs 28 blocks of
tracing. A stack of identical blocks (an ``nn.ModuleList`` of N >= 3 blocks of one class, the
same parameter names, shapes and dtypes, the same repr) is swapped for its first two blocks, the
short model is exported, and block 1's segment of the graph is copied N - 2 times: its inputs that
came from block 0 come from the previous copy, its parameters are the next block's, everything
else (shared conditioning, symbolic sizes) is shared. The graph module holds the model's own
tensors for all N blocks. Whenever the loop might not be uniform (it asks the list's length or
indexes it from the end, the segments are not contiguous, block 1 is not block 0 shifted, block
i's inputs are not block i-1's outputs) the caller exports the whole model and the note says why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from .meta import PATH, SHAPES_RECORDED, normalise_path

KEEP = 2          # blocks kept in the exported short model
MIN_BLOCKS = 3    # shorter stacks are exported as they are


class NotUniform(Exception):
    """The stack's loop is not a uniform chain; the message says why (one line)."""


@dataclass
class Stack:
    name: str               # module path of the nn.ModuleList ("transformer_blocks")
    parent: nn.Module
    attr: str
    blocks: nn.ModuleList   # the original list (restored after the export)


def export_with_repeats(model: nn.Module, export, args: tuple, kwargs: dict, notes: list[str], prepare=None):
    """``export()`` (the caller's export of ``model`` in its current state) on a model whose
    repeated stacks are cut to ``KEEP`` blocks, stitched back to full length; or None, with a
    note saying why, when the full model must be exported instead. ``prepare(short_gm)`` runs
    before stitching (to record node shapes there: the copies take block 1's; the graph module's
    ``meta[SHAPES_RECORDED]`` then says so)."""
    stacks = find_stacks(model)
    if not stacks:
        return None
    try:
        check_loop(model, stacks, args, kwargs)
        gm = _export_short(stacks, export)
        if prepare is not None:
            prepare(gm)
            gm.meta[SHAPES_RECORDED] = True
        for stack in stacks:
            stitch(gm, stack)
        gm.graph.lint()
        gm.recompile()
    except NotUniform as e:
        notes.append(f"exported every block (not the repeats shortcut): {e}")
        return None
    except Exception as e:  # noqa: BLE001 - a stitching bug must cost time, not correctness
        notes.append(f"exported every block: the repeats shortcut failed ({_one_line(e)}); please report it")
        return None
    notes.append("exported " + "; ".join(f"{KEEP} of {len(s.blocks)} {s.name}" for s in stacks)
                 + "; repeated the rest")
    return gm


# -- which lists are stacks ---------------------------------------------------------------------

def find_stacks(model: nn.Module) -> list[Stack]:
    """The ``nn.ModuleList`` s of >= MIN_BLOCKS identical blocks, outermost only."""
    found: list[Stack] = []
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < MIN_BLOCKS or not path:
            continue
        if any(path.startswith(s.name + ".") for s in found):
            continue
        first = block_signature(mod[0])
        if all(block_signature(b) == first for b in list(mod)[1:]):
            parent_path, _, attr = path.rpartition(".")
            found.append(Stack(path, model.get_submodule(parent_path), attr, mod))
    return found


def block_signature(block: nn.Module) -> tuple:
    """What makes blocks "the same": class, tensors (name, shape, dtype), repr, and for every
    submodule its plain attributes (a ``layer_idx`` the forward might read makes blocks differ)
    and how many hooks it has (a hook on one block only makes it differ)."""
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in
                    list(block.named_parameters()) + list(block.named_buffers()))
    attrs = tuple((name, type(m).__name__, _plain(m)) for name, m in block.named_modules())
    return type(block), tensors, repr(block), attrs


_MODULE_STATE = set(vars(nn.Module()))   # what every nn.Module holds: hooks, _modules, training...


def _plain(mod: nn.Module) -> tuple:
    out = []
    for k, v in sorted(vars(mod).items()):
        if k in _MODULE_STATE:
            if "hook" in k and isinstance(v, dict):
                out.append((k, len(v)))
        elif isinstance(v, (int, float, str, bool, type(None))) or (
                isinstance(v, tuple) and all(isinstance(x, (int, float, str, bool)) for x in v)):
            out.append((k, v))
        else:
            out.append((k, type(v).__name__))
    return tuple(out)


# -- the loop, checked at full length ------------------------------------------------------------

def check_loop(model: nn.Module, stacks: list[Stack], args: tuple, kwargs: dict) -> None:
    """Run the model on meta with every block but block 0 of each stack stubbed out; raise
    ``NotUniform`` unless each stack's blocks run once each, in order, block i's tensor inputs
    being block i-1's outputs (carried) or block 0's (shared) by the same pattern for every i."""
    calls: dict[str, list] = {s.name: [] for s in stacks}
    for s in stacks:
        if any("forward" in vars(b) for b in s.blocks):
            raise NotUniform(f"a block of {s.name} has its own forward attribute (a hook library's?)")
    for s in stacks:
        for i, block in enumerate(s.blocks):
            block.forward = _recorder(block, i, calls[s.name])
    try:
        _run_on_meta(model, args, kwargs)
    except NotUniform:
        raise
    except Exception as e:  # noqa: BLE001 - the check could not run: do not guess
        raise NotUniform(f"could not run the model on meta to check its block loops ({_one_line(e)})") from None
    finally:
        for s in stacks:
            for block in s.blocks:
                del block.forward
    for s in stacks:
        _check_calls(s, calls[s.name])


def _recorder(block: nn.Module, i: int, log: list):
    real = type(block).forward.__get__(block)

    def forward(*a, **kw):
        if i == 0:
            out = real(*a, **kw)
        elif not log:
            raise NotUniform(f"block {i} ran before block 0")
        else:
            out = tree_map(lambda t: torch.empty_like(t) if isinstance(t, torch.Tensor) else t, log[0][2])
        log.append((i, (a, kw), out))
        return out

    return forward


def _run_on_meta(model: nn.Module, args: tuple, kwargs: dict) -> None:
    def meta(t):
        return torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t

    a, kw = tree_map(meta, (args, kwargs))
    with torch.no_grad():
        if all(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
            model(*a, **kw)
        else:
            state = {k: meta(v) for k, v in list(model.named_parameters()) + list(model.named_buffers())}
            torch.func.functional_call(model, state, a, kw, strict=False)


def _check_calls(stack: Stack, calls: list) -> None:
    where = stack.name
    order = [c[0] for c in calls]
    if order != list(range(len(stack.blocks))):
        raise NotUniform(f"{where} ran in the order {order[:8]}, not once each in order")
    leaves0, spec0 = tree_flatten(calls[0][1])
    pattern = None
    for i in range(1, len(calls)):
        leaves, spec = tree_flatten(calls[i][1])
        outs = tree_flatten(calls[i - 1][2])[0]
        if spec != spec0:
            raise NotUniform(f"{where}.{i} is called with other arguments than {where}.0")
        roles = []
        for k, (x, x0) in enumerate(zip(leaves, leaves0)):
            if isinstance(x, torch.Tensor):
                carried = [j for j, o in enumerate(outs) if o is x]
                if carried:
                    roles.append(("carried", carried[0]))
                elif x is x0:
                    roles.append(("shared",))
                else:
                    raise NotUniform(f"input {k} of {where}.{i} is neither an output of {where}.{i - 1} nor the "
                                     f"same tensor as {where}.0's (something runs between the blocks)")
            elif type(x) is not type(x0) or x != x0:
                raise NotUniform(f"input {k} of {where}.{i} is {x!r}, of {where}.0 {x0!r}")
            else:
                roles.append(("same",))
        if pattern is None:
            pattern = roles
        elif roles != pattern:
            raise NotUniform(f"{where}.{i} takes its inputs from other places than {where}.1")


# -- the short export ----------------------------------------------------------------------------

def _short_list(blocks: list[nn.Module], name: str, asked: list[str]) -> nn.ModuleList:
    """The first blocks of a stack, noting in ``asked`` what the forward asks of it besides
    iterating. (The log lives outside the module: non-strict export restores module attributes
    after tracing, list objects included.)"""

    class ShortList(nn.ModuleList):
        def __len__(self):
            asked.append(f"the forward asks len({name})")
            return super().__len__()

        def __getitem__(self, idx):
            if isinstance(idx, int) and 0 <= idx < KEEP:   # the same block in the full list
                return self._modules[str(idx)]
            asked.append(f"the forward asks {name}[{idx!r}]")
            return super().__getitem__(idx)

    short = ShortList(blocks)
    asked.clear()                                  # ModuleList's own constructor asks len()
    return short


def _export_short(stacks: list[Stack], export) -> fx.GraphModule:
    asked: list[str] = []
    try:
        for s in stacks:
            setattr(s.parent, s.attr, _short_list(list(s.blocks)[:KEEP], s.name, asked))
        gm = export()
    except Exception as e:  # noqa: BLE001 - e.g. the forward indexes a block the short list lacks
        raise NotUniform(f"the model with {KEEP} blocks per stack does not export ({_one_line(e)})") from None
    finally:
        for s in stacks:
            setattr(s.parent, s.attr, s.blocks)
    if asked:
        raise NotUniform(f"{asked[0]} (what it gets depends on the number of blocks)")
    return gm


# -- stitching -----------------------------------------------------------------------------------

_PREFIX = r"(L\['self'\]\.|L__self___|L__self__|)"


def _block_of(node: fx.Node, name: str) -> int | None:
    """The index of ``name``'s block that ``node`` ran in (outermost match), else None."""
    if node.op in ("get_attr", "call_module"):     # by target (export's _guards_fn borrows a module stack)
        m = re.match(rf"{re.escape(name)}\.(\d+)(\.|$)", node.target)
        return int(m.group(1)) if m else None
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        m = re.match(rf"{re.escape(name)}\.(\d+)(\.|$)", normalise_path(path))
        if m:
            return int(m.group(1))
    return None


def _renamer(name: str, i: int, src: int = 1):
    """Renames a module path or nn_module_stack key of block ``src`` to block ``i``."""
    dotted, mangled = re.escape(name), re.escape(name.replace(".", "_"))
    pat = re.compile(rf"^{_PREFIX}({dotted}\.|{dotted}\[|{mangled}_){src}(?=[\]._]|$)")
    return lambda s: pat.sub(lambda m: f"{m.group(1)}{m.group(2)}{i}", s) if isinstance(s, str) else s


def _segments(graph: fx.Graph, name: str) -> tuple[list[fx.Node], list[fx.Node]]:
    """The graph nodes (get_attrs aside) blocks 0 and 1 of ``name`` ran: two adjacent runs."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    idx = [_block_of(n, name) for n in nodes]
    starts = [k for k in range(1, len(nodes)) if idx[k] == 1 and idx[k - 1] == 0]
    if len(starts) != 1:
        raise NotUniform(f"{name}.0 and {name}.1 do not run as two adjacent pieces of the graph")
    s = starts[0]
    a = s
    while a > 0 and idx[a - 1] == 0:
        a -= 1
    b = s
    while b < len(nodes) and idx[b] == 1:
        b += 1
    # export emits a block's ops in one run, so block 0's run ends where block 1's starts; a run
    # broken by other nodes leaves the two of different lengths, which _match_blocks refuses.
    return nodes[a:s], nodes[s:b]


def _unhoisted(seg0: list[fx.Node], in1: set[fx.Node]) -> list[fx.Node]:
    """``seg0`` less the symbolic sizes that block 1 reuses rather than computes (export makes
    one node per size expression, where it first appears); with their scalar inputs in ``seg0``,
    they count as computed before the stack, shared by every block."""
    hoisted = {x for x in seg0 if _is_scalar(x) and any(u in in1 for u in x.users)}
    todo = list(hoisted)
    while todo:
        for x in todo.pop().all_input_nodes:
            if x in seg0 and x not in hoisted and _is_scalar(x):
                hoisted.add(x)
                todo.append(x)
    return [x for x in seg0 if x not in hoisted]


def _is_scalar(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _match_blocks(name: str, seg0: list[fx.Node], seg1: list[fx.Node]) -> set[fx.Node]:
    """Check that block 1's segment is block 0's shifted by one; return the nodes of block 0's
    segment that block 1 reads where block 0 read an outside value (the carried values)."""
    if len(seg0) != len(seg1):
        raise NotUniform(f"{name}.0 has {len(seg0)} graph nodes, {name}.1 {len(seg1)}")
    in0, in1 = set(seg0), set(seg1)
    to1 = dict(zip(seg0, seg1))
    rename = _renamer(name, 1, src=0)
    carried: set[fx.Node] = set()

    def same(x0, x1, where: fx.Node) -> None:
        if isinstance(x0, fx.Node) != isinstance(x1, fx.Node):
            raise NotUniform(f"{where.name} in {name}.1 differs from its counterpart in {name}.0")
        if isinstance(x0, fx.Node):
            if x0 in in0:                  # both read their own block's node
                ok = to1[x0] is x1
            elif x0.op == "get_attr" and _block_of(x0, name) == 0:   # their own block's weight
                ok = x1.op == "get_attr" and x1.target == _zero_to_one(name, x0.target)
            elif x1 is x0:                 # both read the same outside node
                ok = True
            else:                          # block 0 reads an outside node, block 1 block 0's
                ok = x1 in in0
                carried.add(x1)
            if not ok:
                raise NotUniform(f"{where.name} in {name}.1 reads {x1.name} where {name}.0 reads {x0.name}")
            return
        if isinstance(x0, (tuple, list)) and isinstance(x1, (tuple, list)) and len(x0) == len(x1):
            for y0, y1 in zip(x0, x1):
                same(y0, y1, where)
        elif isinstance(x0, dict) and isinstance(x1, dict) and x0.keys() == x1.keys():
            for k in x0:
                same(x0[k], x1[k], where)
        elif type(x0) is not type(x1) or x0 != x1:
            raise NotUniform(f"{where.name} in {name}.1 has argument {x1!r} where {name}.0 has {x0!r}")

    for n0, n1 in zip(seg0, seg1):
        if n0.op != n1.op or n0.target != n1.target:
            raise NotUniform(f"{name}.1 runs {n1.target} where {name}.0 runs {n0.target}")
        if n0.op == "call_module":
            raise NotUniform(f"{name}.0 calls a submodule graph ({n0.target})")
        same((n0.args, n0.kwargs), (n1.args, n1.kwargs), n1)
        stack0 = {rename(p) for p, _ in (n0.meta.get("nn_module_stack") or {}).values()}
        stack1 = {p for p, _ in (n1.meta.get("nn_module_stack") or {}).values()}
        if stack0 != stack1:
            raise NotUniform(f"{n1.name} in {name}.1 ran in other modules than {n0.name} in {name}.0")
    for n0 in seg0:
        for u in n0.users:
            if u not in in0 and u not in in1:
                raise NotUniform(f"{u.name}, after {name}, reads {n0.name} of {name}.0 (not the last block's)")
    for n in seg0[0].graph.nodes:
        if n not in in0 and n not in in1 and _mutates(n) and any(
                a.op == "get_attr" and _block_of(a, name) is not None for a in n.all_input_nodes):
            raise NotUniform(f"{n.name} ({n.target}) writes a tensor of {name} outside the blocks")
    return carried


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _zero_to_one(name: str, target: str) -> str:
    return f"{name}.1." + target[len(name) + 3:] if target.startswith(f"{name}.0.") else target


def stitch(gm: fx.GraphModule, stack: Stack) -> None:
    """Grow the short graph's ``stack`` from KEEP blocks to all of them, in place."""
    graph, name, n = gm.graph, stack.name, len(stack.blocks)
    seg0, seg1 = _segments(graph, name)
    seg0 = _unhoisted(seg0, set(seg1))
    carried = _match_blocks(name, seg0, seg1)
    in1 = set(seg1)
    to1 = dict(zip(seg0, seg1))
    after = {u: [x for x in u.all_input_nodes if x in in1] for x in seg1 for u in x.users if u not in in1}
    used = {x for n1 in seg1 for x in n1.all_input_nodes if x.op == "get_attr"}
    attrs1 = [a for a in graph.nodes if a in used and _block_of(a, name) == 1]   # in graph order
    _share_tensors(gm, stack, attrs1)
    prev = {x: x for x in seg1}          # block i-1's node for each block-1 node
    last_attr = attrs1[-1] if attrs1 else None
    anchor = seg1[-1]
    for i in range(KEEP, n):
        rename = _renamer(name, i)
        env: dict[fx.Node, fx.Node] = {}
        if last_attr is not None:
            with graph.inserting_after(last_attr):
                for a in reversed(attrs1):   # each lands right after last_attr: reversed keeps the order
                    env[a] = graph.get_attr(rename(a.target))
                    env[a].meta = dict(a.meta)
            last_attr = env[attrs1[-1]]

        def arg(x: fx.Node) -> fx.Node:
            if x in env:
                return env[x]
            if x in carried:
                return prev[to1[x]]
            return x

        for n1 in seg1:
            with graph.inserting_after(anchor):
                env[n1] = anchor = _copy(graph, n1, arg, rename)
        prev = {x: env[x] for x in seg1}
    for u, inputs in after.items():
        for x in inputs:
            u.replace_input_with(x, prev[x])


def _copy(graph: fx.Graph, node: fx.Node, arg, rename) -> fx.Node:
    new = graph.node_copy(node, arg)
    stack = node.meta.get("nn_module_stack")
    if stack:
        new.meta["nn_module_stack"] = {rename(k): (rename(p), t) for k, (p, t) in stack.items()}
    if PATH in node.meta:
        new.meta[PATH] = rename(node.meta[PATH])
    return new


def _share_tensors(gm: fx.GraphModule, stack: Stack, attrs1: list[fx.Node]) -> None:
    """Register blocks KEEP.. of the original stack's tensors on ``gm`` (the same objects)."""
    prefix = f"{stack.name}.1."
    for i in range(KEEP, len(stack.blocks)):
        block = stack.blocks[i]
        for a in attrs1:
            rel = a.target[len(prefix):]
            owner_path, _, leaf = rel.rpartition(".")
            owner = block.get_submodule(owner_path)
            value = getattr(owner, leaf)
            dest = _ensure_module(gm, f"{stack.name}.{i}" + (f".{owner_path}" if owner_path else ""))
            if leaf in owner._parameters:
                dest.register_parameter(leaf, value)
            elif leaf in owner._buffers:
                dest.register_buffer(leaf, value, persistent=leaf not in owner._non_persistent_buffers_set)
            else:
                setattr(dest, leaf, value)


def _ensure_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    return mod


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:200] if text else type(e).__name__
