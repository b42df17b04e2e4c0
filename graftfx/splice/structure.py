"""Structural rewrites: whole blocks become one parallel block, one merged block, or nothing.

Matching is kept apart from rewriting: the ``block`` pattern reads each block's residual stages
(``graftfx.match.block.BlockRegion``) on the traced graph, ``select`` groups the blocks a
structural rule names (``Plan.structural``), and this module rewrites a grafted copy of the
graph, group by group, after the operator rules were spliced (an operator inside a parallel pair
moves into the pair's module with its node).

For blocks (i, i+1) with input x, whose stages are ``h_k = h_{k-1} + u_k(h_{k-1})`` (attention,
[cross-attention,] MLP; ``u`` includes the branch's own adaLN gate, shift and scale):

- ``parallel``: stage by stage, both blocks' branches read the same stream and their updates
  add::

      h_0 = x
      h_k = (h_{k-1} + u_k^i(h_{k-1})) + u_k^{i+1}(h_{k-1})
      y   = h_K                         # DiT: h = x + a_i(x) + a_{i+1}(x); y = h + m_i(h) + m_{i+1}(h)

  Each branch keeps its own conditioning (its adaLN modulation of c) and its weights, copied
  exactly from the two originals. Why this form: it is the paper's parallel block (two
  attention branches on one input, then two MLPs on one intermediate); it keeps every
  pretrained weight and every adaLN chain where it was, so the rewrite starts as close to the
  teacher as a depth-halved block can (the only change is that branch i+1 reads h_{k-1} instead
  of h_{k-1} + u_k^i); with adaLN-Zero gates at zero it is exactly the sequential pair.
- ``merge``: one block of block i's structure whose every parameter (and float buffer) is the
  mean of blocks i and i+1's (``weights = "first"``: block i's).
- ``drop``: the block's output is its input: ``y = x``.

A parallel or merged group is installed as ONE ``call_module`` of an ``fx.GraphModule`` built
from the rewired subgraph (its own copies of the parameters, so training it never touches the
teacher): called as ``module(x, **conditioning)`` -> y, described by a ``Replacement`` whose
``region`` is a ``Region`` of kind ``block_pair`` / ``merged_block`` (input x, output y of the
pair in the teacher graph, ``extra_inputs`` the conditioning), so stage 1 trains it on the pair's
boundary like any operator. Export's batch-size integers are recomputed inside from ``x``, so
the batch stays dynamic. Every rewrite ends with ``graph.lint()``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from graftfx.errors import GraftError
from graftfx.match.block import BLOCK_PAIR, MERGED_BLOCK, BlockRegion, block_members, under
from graftfx.match.region import Region, feature_of
from graftfx.registry import get_structural
from graftfx.rules import Rule
from graftfx.trace.tracer import DTYPE, PATH, SHAPE


@dataclass
class StructuralEdit:
    """One structural rewrite: which blocks, what became of them, and the module that replaces
    them (None for dropped blocks). ``replacement`` is the trainable record (in ``grafts``)."""

    rule: Rule
    form: str                          # parallel | merge | drop
    blocks: tuple[str, ...]            # block paths, e.g. ("blocks.0", "blocks.1")
    target: str | None = None          # module path of the new block in the grafted model
    replacement: object | None = None  # graftfx.splice.splice.Replacement for parallel / merge
    inner: list = field(default_factory=list)   # operator Replacements that moved into the module

    @property
    def path(self) -> str:
        return group_path(self.blocks)

    def as_dict(self) -> dict:
        out = {"rule": self.rule.name, "operator": self.rule.operator, "form": self.form, "blocks": list(self.blocks),
               "path": self.path, "config": dataclasses.asdict(self.rule.config())}
        if self.target:
            out["target"] = self.target
        if self.inner:
            out["inner"] = [r.region.path for r in self.inner]
        return out


def group_path(blocks) -> str:
    """``("blocks.0", "blocks.1")`` -> ``blocks.0+1``; one block -> its own path."""
    if len(blocks) == 1:
        return blocks[0]
    container = blocks[0].rsplit(".", 1)[0]
    return container + "." + "+".join(b.rsplit(".", 1)[-1] for b in blocks)


class BlockModule(fx.GraphModule):
    """A rewritten group of blocks: ``module(x, **conditioning) -> y``, its own parameters."""

    @property
    def takes(self) -> frozenset:
        """What it is called with beyond x, in the operator protocol's terms (``Operator.takes``):
        all of its conditioning, by name, so trainers pass every recorded extra input as a keyword."""
        return frozenset(feature_of(n.target) for n in self.graph.nodes if n.op == "placeholder" and n.target != "x")


class _State:
    """The graph being rewritten and how teacher nodes map onto it."""

    def __init__(self, graph: fx.Graph, env: dict, moved: dict, lookup):
        self.graph, self.env, self.moved, self.lookup = graph, env, moved, lookup
        self.alias: dict[fx.Node, fx.Node] = {}

    def cur(self, node: fx.Node) -> fx.Node:
        n = self.moved.get(node) or self.env[node]
        while n in self.alias:
            n = self.alias[n]
        return n


@dataclass
class _Block:
    """A block on the graph being rewritten."""

    region: BlockRegion
    x: fx.Node
    y: fx.Node
    members: list[fx.Node]
    streams: list[fx.Node]
    updates: list[fx.Node]
    residuals: list[fx.Node]
    extras: dict[fx.Node, str]        # tensor inputs from outside -> name
    scalars: set[fx.Node]
    attrs: set[fx.Node]               # get_attr nodes outside the block that it reads


def _current(state: _State, b: BlockRegion) -> _Block:
    x, y = state.cur(b.input), state.cur(b.output)
    members, outside = block_members(x, y, b.path)
    extras = {state.cur(n): name for name, n in b.extra_inputs.items()}
    scalars = {state.cur(n) for n in b.details.get("scalars", [])}
    attrs = set()
    for n in outside[1:]:
        if n in extras or n in scalars:
            continue
        if n.op == "get_attr":
            attrs.add(n)
            continue
        raise GraftError(f"block {b.path}: after the operator rules it reads {n.name} from outside, which the block "
                         "pattern did not see; apply the structural rule without operator rules on this block")
    return _Block(b, x, y, members, [state.cur(br.stream) for br in b.branches],
                  [state.cur(br.update) for br in b.branches], [state.cur(br.residual) for br in b.branches],
                  extras, scalars, attrs)


def _segments(blk: _Block) -> list[list[fx.Node]]:
    """The block's nodes by stage: stage k holds what u_k needs and no earlier stage computed."""
    order = {n: i for i, n in enumerate(blk.y.graph.nodes)}
    pool = set(blk.members) - set(blk.residuals)
    done: set[fx.Node] = set()
    segs = []
    for k, update in enumerate(blk.updates):
        need, stack = set(), [update]
        while stack:
            n = stack.pop()
            if n in pool and n not in need and n not in done:
                need.add(n)
                stack.extend(n.all_input_nodes)
        bad = [n for n in need for a in n.all_input_nodes if a in blk.residuals[k:]]
        if bad:
            raise GraftError(f"block {blk.region.path}: {bad[0].name} in stage {k} reads a later residual; "
                             "not a sequential residual block")
        done |= need
        segs.append(sorted(need, key=order.__getitem__))
    left = [n for n in pool - done if not ("assert" in str(n.target) and not n.users)]
    if left:
        raise GraftError(f"block {blk.region.path}: {left[0].name} feeds no residual stage; the block pattern and the "
                         "graph disagree")
    return segs


class _Builder:
    """Builds the new block's fx.Graph and the root module holding its parameters."""

    def __init__(self, state: _State, blocks: list[_Block], form: str, weights: str = "mean"):
        self.state, self.blocks, self.form, self.weights = state, blocks, form, weights
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.names: dict[str, str] = {}          # old target -> new target
        self.moved_modules: list[str] = []
        first = blocks[0]
        self.x = self.graph.placeholder("x")
        self.x.meta = dict(first.x.meta)
        self.inputs: dict[str, fx.Node] = {}      # name -> node in the outer graph
        self.ph: dict[fx.Node, fx.Node] = {}
        for blk in blocks:
            for node, name in blk.extras.items():
                if node in self.ph:
                    continue
                while name in self.inputs or name == "x":
                    name += "_"
                p = self.graph.placeholder(name)
                p.meta = dict(node.meta)
                self.ph[node] = p
                self.inputs[name] = node
        self.batch = None
        if any(blk.scalars for blk in blocks):
            self.batch = self.graph.call_function(torch.ops.aten.sym_size.int, (self.x, 0))

    def base_env(self, blk: _Block) -> dict:
        env = {blk.x: self.x, **self.ph}
        for s in blk.scalars:
            env[s] = self.batch
        for a in blk.attrs:
            env[a] = self.copy(a, blk)
        return env

    def new_target(self, target: str, blk: _Block) -> str:
        if target in self.names:
            return self.names[target]
        prefix = blk.region.path
        if under(target, prefix) and target != prefix:
            rest = target[len(prefix) + 1:]
            name = rest if self.form == "merge" else f"{prefix.rsplit('.', 1)[-1]}.{rest}"
        else:
            name = "shared." + target.replace(".", "_")
        self.names[target] = name
        self._install(name, target, blk)
        return name

    def _install(self, name: str, target: str, blk: _Block) -> None:
        value = self.state.lookup(target)
        if self.form == "merge" and self.weights == "mean" and under(target, blk.region.path):
            rest = target[len(blk.region.path) + 1:]
            other_path = self.blocks[1].region.path + "." + rest
            try:
                other = self.state.lookup(other_path)
            except AttributeError:
                raise GraftError(f"merge_blocks: {blk.region.path} has {rest} but {self.blocks[1].region.path} does "
                                 f"not; merged blocks need the same parameters (use parallel_pairs)") from None
            value = _mean(value, other, f"{blk.region.path}.{rest}")
        elif isinstance(value, nn.Module):
            if self.state.is_installed(target):
                self.moved_modules.append(target)       # a just-spliced operator: moved, not copied
            else:
                value = copy.deepcopy(value)
        else:
            value = _copy_tensor(value)
        _put(self.root, name, value)

    def copy(self, node: fx.Node, blk: _Block, env: dict | None = None) -> fx.Node:
        env = env if env is not None else {}

        def arg(a):
            return env[a]

        new = self.graph.node_copy(node, arg)
        if node.op in ("get_attr", "call_module"):
            new.target = self.new_target(node.target, blk)
        return new

    def build(self, class_name: str) -> fx.GraphModule:
        gm = BlockModule(self.root, self.graph, class_name=class_name)
        self.graph.lint()
        gm.requires_grad_(True)   # its own copies are what stage 1 trains, even of a frozen teacher
        return gm


def _copy_tensor(t):
    if isinstance(t, nn.Parameter):
        return nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
    return t.detach().clone() if isinstance(t, torch.Tensor) else copy.deepcopy(t)


def _mean(a, b, where: str):
    if isinstance(a, nn.Module):
        if type(a) is not type(b):
            raise GraftError(f"merge_blocks: {where} is a {type(a).__name__} in one block and a {type(b).__name__} "
                             "in the other; merged blocks need the same modules")
        out = copy.deepcopy(a)
        theirs = dict(b.named_parameters()) | dict(b.named_buffers())
        for name, t in list(out.named_parameters()) + list(out.named_buffers()):
            with torch.no_grad():
                t.copy_(_mean(t, theirs[name], f"{where}.{name}"))
        return out
    if a.shape != b.shape:
        raise GraftError(f"merge_blocks: {where} is {tuple(a.shape)} in one block and {tuple(b.shape)} in the other")
    mean = (a.detach() + b.detach()) / 2 if a.is_floating_point() else a.detach().clone()
    return nn.Parameter(mean, requires_grad=a.requires_grad) if isinstance(a, nn.Parameter) else mean


def _put(root: nn.Module, name: str, value) -> None:
    *parents, last = name.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, nn.Module):
        mod.add_module(last, value)
    elif isinstance(value, nn.Parameter):
        mod.register_parameter(last, value)
    else:
        mod.register_buffer(last, value)


def _parallel(builder: _Builder) -> fx.Node:
    blocks = builder.blocks
    segs = [_segments(blk) for blk in blocks]
    envs = [builder.base_env(blk) for blk in blocks]
    h = builder.x
    for k in range(len(blocks[0].updates)):
        for blk, seg, env in zip(blocks, segs, envs):
            env[blk.streams[k]] = h
            for n in seg[k]:
                env[n] = builder.copy(n, blk, env)
        acc = h
        for blk, env in zip(blocks, envs):    # (h + u^i) + u^{i+1}, each add as the model wrote it
            res = blk.residuals[k]
            acc = builder.graph.node_copy(res, lambda a, s=blk.streams[k], env=env, acc=acc: acc if a is s else env[a])
        h = acc
        for blk, env in zip(blocks, envs):
            env[blk.residuals[k]] = h
    return h


def _sequential(builder: _Builder) -> fx.Node:
    blk = builder.blocks[0]
    env = builder.base_env(blk)
    for n in blk.members:
        if "assert" in str(n.target) and not n.users:
            continue
        env[n] = builder.copy(n, blk, env)
    return env[blk.y]


def apply_structure(plan, graph: fx.Graph, env: dict, moved: dict, lookup, installed: dict,
                    records: list, free_target, record) -> tuple[list[StructuralEdit], list]:
    """Rewrite ``graph`` for every structural group of ``plan``; return the edits and the
    records list with the operator Replacements that moved into a group taken out (they are
    the group edit's ``inner``) and each group's trainable record (``record``: the splicer's
    ``Replacement`` class) added. ``lookup(target)`` is the module or tensor a target names;
    ``free_target(path, replaced)`` a module path no surviving node uses."""
    state = _State(graph, env, moved, lookup)
    state.is_installed = lambda t: t in installed
    order = {n: i for i, n in enumerate(plan.traced.graph.nodes)}
    groups = sorted(plan.structural, key=lambda rg: order[rg[1][0].output])
    edits = []
    for rule, group in groups:
        spec = get_structural(rule.operator, rule.where)
        blocks = [_current(state, b) for b in group]
        edit = StructuralEdit(rule, spec.form, tuple(b.path for b in group))
        if spec.form == "drop":
            blk = blocks[0]
            blk.y.replace_all_uses_with(blk.x)
            state.alias[blk.y] = blk.x
            _erase(graph, blk.members)
        else:
            edit.inner = [r for r in records if any(under(r.region.path, b.path) for b in group)]
            builder = _Builder(state, blocks, spec.form, getattr(rule.config(), "weights", "mean"))
            out = _parallel(builder) if spec.form == "parallel" else _sequential(builder)
            builder.graph.output(out)
            sub = builder.build("ParallelBlocks" if spec.form == "parallel" else "MergedBlock")
            container = group[0].path.rsplit(".", 1)[0]
            target = free_target(f"{container}.{'_'.join(b.path.rsplit('.', 1)[-1] for b in group)}",
                                 {n for blk in blocks for n in blk.members})
            x, y = blocks[0].x, blocks[-1].y
            with graph.inserting_after(y):
                new = graph.call_module(target, (x,), dict(builder.inputs))
            new.meta.update({PATH: target, SHAPE: y.meta.get(SHAPE), DTYPE: y.meta.get(DTYPE),
                             "graftfx_replaces": edit.path, "graftfx_structure": spec.form})
            y.replace_all_uses_with(new)
            state.alias[y] = new
            order_now = {n: i for i, n in enumerate(graph.nodes)}
            _erase(graph, sorted({n for blk in blocks for n in blk.members}, key=order_now.__getitem__))
            installed[target] = sub
            for r in edit.inner:                     # operators now live inside the group's module
                installed.pop(r.target, None)
                r.target = f"{target}.{builder.names.get(r.target, r.target)}"
            edit.target = target
            edit.replacement = record(rule, _group_region(group, spec.form), target, new.name, rule.operator,
                                           dataclasses.asdict(rule.config()))
            records = [r for r in records if r not in edit.inner] + [edit.replacement]
        graph.lint()
        edits.append(edit)
    return edits, records


def _erase(graph: fx.Graph, members) -> None:
    for n in reversed(members):
        if not n.users and not n._erased:
            graph.erase_node(n)


def _group_region(group, form: str) -> Region:
    """The record of a rewritten group on the teacher graph: input x of the first block, output
    of the last, every block's conditioning as extra inputs, every block's nodes."""
    first, last = group[0], group[-1]
    extras: dict[str, fx.Node] = {}
    for b in group:
        for name, node in b.extra_inputs.items():
            if node in extras.values():
                continue
            while name in extras or name == "x":
                name += "_"
            extras[name] = node
    order = {n: i for i, n in enumerate(first.output.graph.nodes)}
    nodes = tuple(sorted({n for b in group for n in b.nodes}, key=order.__getitem__))
    return Region(path=group_path([b.path for b in group]), kind=BLOCK_PAIR if form == "parallel" else MERGED_BLOCK,
                  pattern="block", input=first.input, output=last.output, nodes=nodes, width=first.width,
                  out_width=last.out_width, tokens=first.tokens, grid=first.grid, block_index=first.block_index,
                  params=sum(b.params for b in group), flops=sum(b.flops for b in group), dtype=first.dtype,
                  details={"blocks": [b.path for b in group], "form": form, "stages": list(first.stages)},
                  extra_inputs=extras)
