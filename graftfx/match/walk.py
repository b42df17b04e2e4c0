"""Graph walks shared by the patterns: back to a projection, forward to a projection, region sets,
and the layout probe that reads which channels of a projection end up where.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graftfx.trace.ops import SHAPE_OPS, attr_value, linear_input, op_kind, tensor_args
from graftfx.trace.tracer import node_shape

NORMS = {"layer_norm", "rms_norm", "group_norm"}
SCALARS = (int, float)


@dataclass
class Chain:
    """A path from a source node to a consumer's argument through value-preserving ops."""

    source: fx.Node | None                  # the linear (or other op) the walk stopped at
    nodes: list[fx.Node] = field(default_factory=list)  # source's consumers up to the end, in order
    scale: float = 1.0                      # product of scalar multiplies on the way
    norm: fx.Node | None = None             # a q/k norm crossed on the way
    stop_kind: str = ""                     # op kind of the source


def walk_back(start: fx.Node, gm: fx.GraphModule, allow_norm: bool = False) -> Chain:
    """Follow ``start`` back through shape ops, scalar mul/div (and one norm when allowed)."""
    chain = Chain(None)
    node = start
    while True:
        kind = op_kind(node, gm)
        if kind == "linear" or kind == "addmm":
            chain.source, chain.stop_kind = node, "linear"
            break
        if kind in SHAPE_OPS or kind == "size":
            prev = first_tensor_arg(node)
        elif kind in ("mul", "div") and scalar_operand(node) is not None:
            value = scalar_operand(node)
            chain.scale *= value if kind == "mul" else 1.0 / value
            prev = first_tensor_arg(node)
        elif allow_norm and kind in NORMS and chain.norm is None:
            chain.norm = node
            prev = first_tensor_arg(node)
        else:
            chain.source, chain.stop_kind = node, kind
            break
        chain.nodes.insert(0, node)
        if prev is None:
            chain.source, chain.stop_kind = node, kind
            break
        node = prev
    return chain


def walk_forward(start: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node | None, list[fx.Node], str]:
    """From ``start`` follow single-user shape ops to the next linear.

    Returns (linear or None, nodes crossed, why it stopped).
    """
    crossed: list[fx.Node] = []
    node = start
    while True:
        users = [u for u in node.users if not is_side_effect(u)]
        if len(users) != 1:
            return None, crossed, f"{node.name} has {len(users)} users"
        user = users[0]
        kind = op_kind(user, gm)
        if kind in ("linear", "addmm") and linear_input(user, gm) is node:
            return user, crossed, ""
        if kind not in SHAPE_OPS:
            return None, crossed, f"{node.name} flows into {kind} ({user.name}), not a linear"
        crossed.append(user)
        node = user


def first_tensor_arg(node: fx.Node) -> fx.Node | None:
    for a in node.args:
        if isinstance(a, fx.Node):
            return a
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, fx.Node):
                    return b
    return None


def scalar_operand(node: fx.Node):
    a, b = (list(node.args) + [None, None])[:2]
    if isinstance(a, fx.Node) and isinstance(b, SCALARS) and not isinstance(b, bool):
        return float(b)
    if isinstance(b, fx.Node) and isinstance(a, SCALARS) and not isinstance(a, bool) and op_kind(node) == "mul":
        return float(a)
    return None


def is_side_effect(node: fx.Node) -> bool:
    """A node nothing uses that only checks (export's ``_assert_tensor_metadata``/``_assert_scalar``)."""
    return not node.users and "assert" in op_kind(node)


def descendants(roots: list[fx.Node], ceiling: int | None = None, order: dict | None = None) -> set[fx.Node]:
    """Nodes that depend on any of ``roots``; with ``ceiling``, only up to that graph position."""
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen and (ceiling is None or order[u] <= ceiling):
                seen.add(u)
                stack.append(u)
    return seen


def ancestors(node: fx.Node, floor: int = -1, order: dict | None = None) -> set[fx.Node]:
    """Nodes ``node`` depends on; with ``floor``, only those at graph position > floor."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for a in tensor_args(n):
            if a not in seen and (order is None or order[a] > floor):
                seen.add(a)
                stack.append(a)
    return seen


def positions(graph: fx.Graph) -> dict[fx.Node, int]:
    """Node -> position in graph order (cached until the graph changes)."""
    cache = graph.__dict__.setdefault("_graftfx_positions", {})
    key = len(graph.nodes)
    if cache.get("key") != key or cache.get("first") is not next(iter(graph.nodes), None):
        cache.clear()
        cache.update(key=key, first=next(iter(graph.nodes), None), order={n: i for i, n in enumerate(graph.nodes)})
    return cache["order"]


def region_nodes(inputs: list[fx.Node], output: fx.Node) -> tuple[fx.Node, ...]:
    """Nodes on paths from ``inputs`` to ``output`` (output included, inputs excluded), plus
    the dead-end checks (asserts) hanging off them, in graph order.

    Ancestors of the inputs are excluded: a cross-attention's context also feeds earlier
    blocks, whose nodes lie between the context and this output but are not this region's.
    """
    order = positions(output.graph)
    floor = min(order[i] for i in inputs)  # nothing before the earliest input can be inside
    inside = (ancestors(output, floor, order) | {output}) & descendants(inputs, order[output], order)
    if len(inputs) > 1:
        inside -= set().union(*(ancestors(i, floor, order) for i in inputs))
    inside |= {u for n in inside for u in n.users if is_side_effect(u)}
    return tuple(sorted(inside, key=order.__getitem__))


def params_of(nodes, gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Parameters and buffers the nodes use, by qualified name (each tensor once)."""
    found: dict[str, torch.Tensor] = {}
    for n in nodes:
        if n.op == "call_module":
            for name, p in gm.get_submodule(n.target).named_parameters():
                found[f"{n.target}.{name}"] = p
        for a in tensor_args(n):
            obj = attr_value(a, gm)
            if isinstance(obj, torch.Tensor):
                found[a.target] = obj
    return found


# ---------------------------------------------------------------------------------------------
# Layout probe: run only the value-moving ops of a chain on channel-index tensors.
# ---------------------------------------------------------------------------------------------

def probe(chain_nodes: list[fx.Node], seed: fx.Node, seed_value: torch.Tensor, gm: fx.GraphModule,
          want: fx.Node) -> torch.Tensor:
    """Evaluate ``want`` from ``seed`` (given ``seed_value``) through ``chain_nodes``.

    Sizes come from the recorded example shapes; norms, dropout and scalar scaling count as
    identity (they do not move values). Used to learn layouts (which rows of a fused qkv
    become which head of q) exactly, whatever the model's reshape/permute conventions.
    """
    key = _probe_key(chain_nodes, seed, seed_value, gm, want)
    if key is not None and key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    result = _probe(chain_nodes, seed, seed_value, gm, want)
    if key is not None:
        if len(_PROBE_CACHE) > 256:
            _PROBE_CACHE.clear()
        _PROBE_CACHE[key] = result
    return result


_PROBE_CACHE: dict = {}


def _probe_key(chain_nodes, seed, seed_value, gm, want):
    """Structural signature of a probe: repeated blocks share one (nodes replaced by their
    place in the chain, side inputs by their static value)."""
    index = {n: i for i, n in enumerate(chain_nodes)}
    index[seed] = -1

    def sig(a):
        if isinstance(a, fx.Node):
            if a in index:
                return ("chain", index[a])
            try:
                v = _static_value(a, gm)
            except (ValueError, TypeError, IndexError):
                return ("node", a.name)
            return ("static", tuple(v) if isinstance(v, torch.Size) else v)
        if isinstance(a, (list, tuple)):
            return tuple(sig(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, sig(v)) for k, v in a.items()))
        return repr(a)

    try:
        body = tuple((n.op, str(n.target), op_kind(n, gm), sig(n.args), sig(n.kwargs)) for n in chain_nodes)
    except Exception:  # noqa: BLE001 - an unhashable oddity: just do not cache
        return None
    return (tuple(seed_value.shape), str(seed_value.dtype), body, index.get(want, want.name))


def probe_many(chain_nodes: list[fx.Node], seeds: dict, gm: fx.GraphModule, want: fx.Node,
               through: dict | None = None) -> torch.Tensor:
    """``probe`` with several seeds (e.g. the two streams a joint attention concatenates) and
    ``through``: nodes taken as their given operand (a rotary embedding: ``q*cos + rot(q)*sin``
    keeps q's channels in place, so the layout probe passes through it as q)."""
    return _probe(chain_nodes, None, None, gm, want, seeds=seeds, through=through or {})


def _probe(chain_nodes, seed, seed_value, gm, want, seeds=None, through=None):
    env: dict[fx.Node, object] = dict(seeds) if seeds else {seed: seed_value}
    through = through or {}
    chain = set(chain_nodes) | set(through)

    def value(n):
        if isinstance(n, fx.Node):
            if n in env:
                return env[n]
            env[n] = evaluate(n)
            return env[n]
        if isinstance(n, (list, tuple)):
            return type(n)(value(x) for x in n)
        return n

    def evaluate(n: fx.Node):
        kind = op_kind(n, gm)
        if n in through:
            return value(through[n])
        if n not in chain:
            return _static_value(n, gm)
        if kind in NORMS or kind == "dropout" or kind == "identity" or \
                (kind in ("mul", "div") and scalar_operand(n) is not None) or kind in ("to", "alias", "clone", "contiguous"):
            return value(first_tensor_arg(n))
        args = value(n.args)
        kwargs = {k: value(v) for k, v in n.kwargs.items()}
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        raise ValueError(f"cannot probe through {n.op} {n.name}")

    return value(want)


def _static_value(n: fx.Node, gm: fx.GraphModule):
    """Values of side nodes a shape op needs: sizes from recorded shapes, shape attributes."""
    kind = op_kind(n, gm)
    if n.op == "call_function" and n.target is builtins.getattr and n.args[1] == "shape":
        return torch.Size(node_shape(n.args[0]))
    if kind == "size":
        shape = node_shape(n.args[0])
        if n.op == "call_method":
            return torch.Size(shape) if len(n.args) < 2 else shape[n.args[1]]
        return shape[n.args[1]]
    if n.op == "call_function" and n.target is operator.getitem:
        base = _static_value(n.args[0], gm)
        return base[n.args[1]]
    if n.op == "call_function" and n.target in (operator.floordiv, operator.mul, operator.add, operator.sub):
        a = _static_value(n.args[0], gm) if isinstance(n.args[0], fx.Node) else n.args[0]
        b = _static_value(n.args[1], gm) if isinstance(n.args[1], fx.Node) else n.args[1]
        return n.target(a, b)
    shape = node_shape(n)
    if shape == ():
        raise ValueError(f"cannot probe: {n.name} is a runtime scalar")
    raise ValueError(f"cannot probe through side input {n.name} ({kind})")


def channel_ids(shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``shape`` whose value at [..., c] is c."""
    ids = torch.arange(shape[-1], dtype=torch.int32)
    return ids.expand(*shape)  # a view: only a probe that misses the cache materialises it
