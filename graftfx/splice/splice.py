"""``splice(plan)``: replace each selected region by one ``call_module`` node of its new operator.

The traced graph is copied first (the TracedGraph stays as it was, for before/after views).
Operator rules are spliced first; structural rules (``graftfx.splice.structure``: parallel
pairs, merged and dropped blocks) then rewrite the result, so an operator inside a parallel pair
moves into the pair's module.
Everything outside the regions keeps its nodes and its very weight tensors (shared with the
original model, not copied). The new operator is installed under the region's own module path
(``blocks.3.attn``), so the grafted state dict reads like the original one.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from graftfx.errors import GraftError
from graftfx.match.region import Region, feature_of
from graftfx.registry import get_operator
from graftfx.rules import Rule
from graftfx.state import check_state, tied_names
from graftfx.trace.ops import fetch_attr
from graftfx.trace.tracer import DTYPE, PATH, SHAPE

from ..select.select import Plan
from .structure import apply_structure


@dataclass
class Replacement:
    """One splice: the rule, the region it replaced, and where the new operator lives."""

    rule: Rule
    region: Region
    target: str            # module path of the new operator in the grafted model
    node_name: str         # its call_module node
    operator: str          # registry name
    config: dict           # dataclasses.asdict of the operator's config: every option, defaults included

    @property
    def structural(self) -> bool:
        """A parallel pair or merged block (``graftfx.splice.structure``), not an operator."""
        return self.rule.structural

    def as_dict(self) -> dict:
        r = self.region
        return {"rule": self.rule.name, "path": r.path, "kind": r.kind, "target": self.target,
                "operator": self.operator, "config": dict(self.config), "width": r.width,
                "tokens": r.tokens, "heads": r.heads, "hidden": r.hidden, "params_before": r.params,
                "flops_before": r.flops}


class GraftedModule(fx.GraphModule):
    """A rewritten graph module that remembers its grafts.

    Same call signature as the original model. ``spliced_parameters()`` are the only
    parameters stage-1 distillation trains: every spliced operator's, and every parameter of a
    parallel pair's or merged block's module (its own copies of the blocks' weights, operators
    moved into it included, each once). Dropped blocks have none. ``structure`` lists the
    structural edits (``graftfx.splice.structure.StructuralEdit``).
    """

    grafts: list[Replacement]
    structure: list = []

    def spliced_modules(self) -> dict[str, nn.Module]:
        return {g.target: self.get_submodule(g.target) for g in self.grafts}

    def spliced_parameters(self):
        for module in self.spliced_modules().values():
            yield from module.parameters()

    def spliced_named_parameters(self):
        for target, module in self.spliced_modules().items():
            for name, p in module.named_parameters():
                yield f"{target}.{name}", p

    def save_state(self, path) -> None:
        """The grafted model's state as safetensors (tied tensors handled), written atomically."""
        from safetensors.torch import save_model

        from graftfx.io import atomic_path

        with atomic_path(path) as tmp:
            save_model(self, str(tmp))

    def load_state(self, path) -> None:
        """Load a state saved by ``save_state``; keys and shapes are checked first, strictly."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        tied = {k for k, others in tied_names(self).items() if others & set(shapes)}
        check_state(own, shapes, what=f"{path} (grafted model state)", optional=tied,
                    fix="load the state saved from the same base model and rules")
        load_model(self, str(path), strict=True)


def build_operator(rule: Rule, region: Region, device=None) -> nn.Module:
    """The rule's operator for ``region``, on the region's device (or ``device``: e.g. build real
    operators from a plan traced on the meta device, for training from a cache).

    The config is validated first (``Rule.config``); anything that fails only against this
    region (heads not dividing its width, no token grid, ...) is a GraftError naming the rule,
    the region and the operator's own advice."""
    spec = get_operator(rule.operator, rule.where)
    config = rule.config()
    device = torch.device(device) if device is not None else _device_of(region)
    try:
        if device.type == "meta":
            with torch.device("meta"):
                op = spec.cls.from_region(region, config)
        else:
            op = spec.cls.from_region(region, config).to(device=device)
    except NotImplementedError as e:  # copying weights out of a meta tensor
        raise GraftError(f"{rule.where}operator {rule.operator!r} for {region.path} needs the model's real "
                         f"weights (options {rule.options}); trace a materialised model: {e}") from None
    except ValueError as e:
        raise GraftError(f"{rule.where}operator {rule.operator!r} cannot replace {region.path or '<root>'} "
                         f"({region.summary()}): {e}") from None
    if not isinstance(getattr(op, "config", None), spec.config):
        raise TypeError(f"operator {rule.operator!r}: {type(op).__name__}.from_region must keep its config as "
                        f"self.config (a {spec.config.__name__}); see graftfx.operator")
    if region.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        op = op.to(dtype=region.dtype)
    from graftfx.limits import check_operator_size  # the size ceiling (graftfx/limits.py)

    check_operator_size(op, rule, region)
    return op


def _device_of(region: Region) -> torch.device:
    for t in region.weights.values():
        return t.device
    return torch.device("cpu")


def splice(plan: Plan) -> GraftedModule:
    """Apply ``plan`` to a copy of its traced graph and return the grafted module."""
    traced = plan.traced
    old = traced.gm.graph
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(old._codegen)
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(old, env)
    graph.output(out)

    selected = plan.selected
    installed: dict[str, nn.Module] = {}
    records = []
    moved: dict[fx.Node, fx.Node] = {}       # a replaced region's output -> its call_module node
    for rule, region in selected:
        op = build_operator(rule, region)
        target = _free_target(region.path or rule.name, graph, installed, {env[n] for n in region.nodes})
        node = _replace(graph, env, region, target, op)
        if not region.extra_outputs:
            moved[region.output] = node
        _drop_unused_attrs(graph)
        installed[target] = op
        records.append(Replacement(rule, region, target, node.name, rule.operator, dataclasses.asdict(op.config)))
    graph.lint()
    edits = []
    if plan.structural:
        def lookup(target):
            return installed[target] if target in installed else fetch_attr(traced.gm, target)

        edits, records = apply_structure(plan, graph, env, moved, lookup, installed, records,
                                         lambda path, replaced: _free_target(path, graph, installed, replaced),
                                         Replacement)
        _drop_unused_attrs(graph)
        graph.lint()

    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            root[node.target] = installed[node.target] if node.target in installed else fetch_attr(traced.gm, node.target)
    gm = GraftedModule(root, graph, class_name=type(traced.model).__name__ + "Grafted")
    gm.grafts = records
    gm.structure = edits
    gm.rules = plan.rules
    gm.tracer = traced.tracer
    gm.input_spec = describe_inputs(traced.args, traced.kwargs)
    gm.train(traced.model.training)
    return gm


def passed_inputs(region: Region, op: nn.Module) -> dict[str, fx.Node]:
    """The region's extra inputs the operator takes (``Operator.takes``), by name."""
    takes = getattr(op, "takes", frozenset())
    return {name: node for name, node in region.extra_inputs.items() if feature_of(name) in takes}


def _replace(graph: fx.Graph, env, region: Region, target: str, op: nn.Module) -> fx.Node:
    """Insert the region's call_module node and erase the region.

    The operator gets the region's input (and context), and as keyword arguments the extra
    inputs it takes (mask, bias terms, rotary tables). A region with a second output (joint
    attention's context stream) gets a tuple back, unpacked by getitem nodes."""
    nodes = [env[n] for n in region.nodes]
    if any(n.graph is not graph or n._erased for n in nodes):
        raise GraftError(f"region {region.path} overlaps a region spliced before it; select one of them")
    outputs = [env[o] for o in region.outputs]
    args = (env[region.input],) if region.context is None else (env[region.input], env[region.context])
    kwargs = {name: env[node] for name, node in passed_inputs(region, op).items()}
    if len(outputs) == 1:
        anchor = outputs[0]
    else:   # before the first use of any output: right after the last input it reads
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = max([*args, *kwargs.values()], key=order.__getitem__)
    with graph.inserting_after(anchor):
        new = graph.call_module(target, args, kwargs)
    new.meta[PATH] = target
    new.meta["graftfx_replaces"] = region.path
    if len(outputs) == 1:
        new.meta[SHAPE] = outputs[0].meta.get(SHAPE)
        new.meta[DTYPE] = outputs[0].meta.get(DTYPE)
        outputs[0].replace_all_uses_with(new)
    else:
        prev = new
        for i, output in enumerate(outputs):
            with graph.inserting_after(prev):
                item = graph.call_function(operator.getitem, (new, i))
            item.meta[PATH] = target
            item.meta[SHAPE] = output.meta.get(SHAPE)
            item.meta[DTYPE] = output.meta.get(DTYPE)
            output.replace_all_uses_with(item)
            prev = item
    for node in reversed(nodes):  # users before producers; keep what nodes outside still use
        if not node.users:
            graph.erase_node(node)
    return new


def _drop_unused_attrs(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


def _free_target(path: str, graph: fx.Graph, installed: dict, replaced: set) -> str:
    """``path`` unless a node that survives the splice still uses a module under it; then
    ``path_graft``. Parameters read only by the replaced nodes do not count."""
    used = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr") and n not in replaced
            and not (n.op == "get_attr" and n.users and all(u in replaced for u in n.users))}
    target = path.replace("/", "_") or "graft"
    candidate, k = target, 0
    while candidate in installed or any(u == candidate or u.startswith(candidate + ".") for u in used):
        k += 1
        candidate = f"{target}_graft" if k == 1 else f"{target}_graft{k}"
    return candidate


def describe_inputs(args: tuple, kwargs: dict) -> dict:
    """A JSON-able description of example inputs (shapes and dtypes), to trace again later."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return {"tensor": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
        if isinstance(v, dict) and any(isinstance(u, torch.Tensor) for u in v.values()):
            return {"dict": {str(k): one(u) for k, u in v.items()}}   # tensors in a dict, one level deep
        return {"value": v}
    return {"args": [one(a) for a in args], "kwargs": {k: one(v) for k, v in kwargs.items()}}


def make_inputs(spec: dict) -> tuple[tuple, dict]:
    """Example inputs from ``describe_inputs``: floats random, integers zero (valid indices)."""
    def one(d):
        if "dict" in d:
            return {k: one(u) for k, u in d["dict"].items()}
        if "tensor" in d:
            dtype = getattr(torch, d["dtype"])
            if dtype.is_floating_point:
                return torch.randn(d["tensor"], dtype=dtype)
            return torch.zeros(d["tensor"], dtype=dtype)
        return d["value"]
    return tuple(one(a) for a in spec["args"]), {k: one(v) for k, v in spec["kwargs"].items()}
