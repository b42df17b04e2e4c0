"""Attention patterns: self, causal self, cross and joint attention.

An attention core is ``scaled_dot_product_attention(q, k, v[, attn_mask, is_causal])`` or the
explicit ``softmax(q @ k^T [* scale] [+ bias/mask ...]) @ v`` (export's
``_assert_tensor_metadata`` side nodes included). From the core, q, k and v are followed back
through reshapes/permutes, casts, scalar scaling, one q/k norm and a rotary embedding
(``q*cos + rot(q)*sin``, interleaved or half-split) to their projections, and the output forward
to the output projection (or to where the merged heads leave, when the block shares one
projection with its MLP, as Flux's single blocks do). What the projections read decides the kind:

- q, k, v from one tensor: self-attention; causal when the mask (or ``is_causal``) says so;
  joint attention when that tensor's token stream is a concatenation of two or more input
  streams (however many norms, modulations or projections stand between the ``cat`` and q/k/v);
- k, v from another tensor: cross-attention;
- q, k and v each a token-axis concatenation of per-stream projections (MMDiT: SD3, Flux double
  blocks): joint attention over both streams, with both streams' inputs and outputs.

Masks: an input-independent mask that keeps everything (transformers' all-True mask for
unpadded encoders) is no mask; one that is exactly causal makes the kind causal; an
input-dependent one (key padding) is carried as the region's ``mask`` input; static additive
terms (relative-position bias, a shifted-window mask) as ``bias`` inputs. Every core that does
not become a region is a near miss naming the condition it failed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import setitem as _setitem

import torch
import torch.fx as fx

from graftfx.match.cost import count_params, graph_flops
from graftfx.match.grid import region_grid
from graftfx.match.paths import block_index, common_path
from graftfx.match.region import (CAUSAL_SELF_ATTENTION, CROSS_ATTENTION, JOINT_ATTENTION, SELF_ATTENTION,
                                  Region)
from graftfx.match.report import Candidate, MatchReport, analysis_cache
from graftfx.match.streams import depends_on_input, static_values, stream_origin
from graftfx.match.walk import (NORMS, channel_ids, first_tensor_arg, is_side_effect, params_of, probe_many,
                                region_nodes, scalar_operand, walk_forward)
from graftfx.registry import register_pattern
from graftfx.trace.ops import SHAPE_OPS, attr_value, linear_input, linear_params, op_kind, tensor_args
from graftfx.trace.tracer import TracedGraph, module_path, node_dtype, node_shape

KINDS = (SELF_ATTENTION, CAUSAL_SELF_ATTENTION, CROSS_ATTENTION, JOINT_ATTENTION)
_CASTS = {"to", "alias", "contiguous", "clone", "dropout", "identity", "type_as"}
_ROT_OPS = SHAPE_OPS | {"neg", "aten::neg", "cat", "stack", "size"}
_SDPA_FX_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class Miss(Exception):
    """A condition an attention core failed (the near miss's reason)."""


@dataclass
class Core:
    node: fx.Node                     # the SDPA node, or the explicit scores matmul
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node                      # attention output, (B, H, L, Dh) or (B*H, L, Dh)
    scale: float | None = None        # the core's own scale (None: 1/sqrt(Dh))
    mask: fx.Node | None = None       # SDPA attn_mask
    causal: bool = False
    steps: list = field(default_factory=list)   # explicit: ("add", node) / ("view", shape) before softmax
    explicit: bool = False
    anchor: fx.Node | None = None     # what reports name the core by: the SDPA node or the softmax
    gqa: bool = False                 # SDPA enable_gqa: k/v heads repeat_interleave'd up to q's

    def __post_init__(self):
        self.anchor = self.anchor or self.node


def _sdpa_args(node: fx.Node) -> dict:
    if isinstance(node.target, torch._ops.OpOverload):
        names = [a.name for a in node.target._schema.arguments]
    else:
        names = list(_SDPA_FX_ARGS)
    found = dict(zip(names, node.args))
    found.update(node.kwargs)
    return found


def _cores(traced: TracedGraph):
    """Every attention core: a Core, or (anchor node, reason) for one that cannot be read."""
    gm = traced.gm
    for node in traced.graph.nodes:
        kind = op_kind(node, gm)
        if kind in ("sdpa", "sdpa_tuple"):
            a = _sdpa_args(node)
            out = node
            if kind == "sdpa_tuple":
                firsts = [u for u in node.users if op_kind(u) == "getitem" and u.args[1] == 0]
                out = firsts[0] if firsts else node
            mask = a.get("attn_mask")
            yield Core(node, a["query"], a["key"], a["value"], out, a.get("scale"),
                       mask if isinstance(mask, fx.Node) else None, a.get("is_causal") is True,
                       gqa=a.get("enable_gqa") is True)
        elif kind == "softmax":
            found = _explicit_core(node, gm)
            if found is not None:
                yield found


def _explicit_core(softmax: fx.Node, gm):
    """softmax(scores) @ v, scores = (q @ k^T) then scalar scaling, additive terms and views."""
    pv = _pv_matmul(softmax, gm)
    steps = []
    scale = 1.0
    node = first_tensor_arg(softmax)
    while node is not None:
        kind = op_kind(node, gm)
        if kind in ("matmul", "baddbmm"):
            break
        if kind in ("mul", "div") and scalar_operand(node) is not None:
            s = scalar_operand(node)
            scale *= s if kind == "mul" else 1.0 / s
            node = first_tensor_arg(node)
        elif kind in _CASTS:
            node = first_tensor_arg(node)
        elif kind in ("view", "reshape"):
            steps.insert(0, ("view", node_shape(node)))
            node = first_tensor_arg(node)
        elif kind == "add" and len([a for a in node.args[:2] if isinstance(a, fx.Node)]) == 2:
            a, b = node.args[:2]
            chain, term = (a, b) if _reaches_matmul(a, gm) else (b, a)
            steps.insert(0, ("add", term))
            node = chain
        elif (fill := _fill_step(node, kind, gm)) is not None:
            step, node = fill
            steps.insert(0, step)
        else:
            if pv is not None:
                return softmax, (f"softmax(...) @ v found, but the scores come from {kind} ({node.name}), "
                                 "not q @ k^T with scaling and additive terms")
            return None
    if node is None or pv is None:
        return None
    if op_kind(node, gm) == "matmul":
        q, kt = node.args[:2]
    else:
        q, kt = node.args[1:3]
        scale *= float(node.kwargs.get("alpha", 1.0))
    if op_kind(kt, gm) != "transpose":
        return softmax, "scores are q @ k without a transpose of k"
    views = [step[1] for step in steps if step[0] == "view"]
    if views and views[-1] != node_shape(node):
        return softmax, "the scores are reshaped between q @ k^T and the softmax and not reshaped back"
    return Core(node, q, kt.args[0], pv.args[1], pv, scale, steps=steps, explicit=True, anchor=softmax)


def _fill_step(node: fx.Node, kind: str, gm):
    """``scores.masked_fill(cond, -inf)`` -> (("fill", cond, value), scores); ``torch.where(cond,
    scores, -inf)`` -> (("keep", cond, value), scores); None for anything else. Only a fill that
    hides a score (-inf, or a value <= -1e4 such as finfo.min) is a mask."""
    args = node.args
    if kind in ("masked_fill", "aten::masked_fill") and len(args) >= 3 and isinstance(args[1], fx.Node):
        scores, cond, value, step = args[0], args[1], args[2], "fill"
    elif kind in ("where", "aten::where") and len(args) == 3 and isinstance(args[0], fx.Node):
        cond, scores, value, step = args[0], args[1], args[2], "keep"
    else:
        return None
    if isinstance(value, fx.Node):
        value = _scalar_value(value, gm)
    if not isinstance(scores, fx.Node) or not isinstance(value, (int, float)) or value > -1e4 \
            or not _reaches_matmul(scores, gm):
        return None
    return (step, cond, float(value)), scores


def _scalar_value(node: fx.Node, gm):
    """A 0-d constant (``torch.tensor(-inf)`` held as an attribute, or a full/scalar_tensor)."""
    try:
        value = attr_value(node, gm) if node.op == "get_attr" else None
    except Exception:  # noqa: BLE001
        value = None
    if value is None and node.op == "call_function" and getattr(node.target, "__name__", "").startswith(
            ("scalar_tensor", "full")):
        value = node.args[-1] if node.args else None
        return value if isinstance(value, (int, float)) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


def _pv_matmul(softmax: fx.Node, gm):
    node = softmax
    while True:
        users = [u for u in node.users if not is_side_effect(u)]
        if len(users) != 1:
            return None
        user = users[0]
        if op_kind(user, gm) == "matmul" and user.args[0] is node:
            return user
        if op_kind(user, gm) not in SHAPE_OPS:
            return None
        node = user


def _reaches_matmul(node: fx.Node, gm, limit: int = 12) -> bool:
    for _ in range(limit):
        kind = op_kind(node, gm)
        if kind in ("matmul", "baddbmm"):
            return True
        if kind == "add":
            return any(isinstance(a, fx.Node) and _reaches_matmul(a, gm, limit - 1) for a in node.args[:2])
        node = first_tensor_arg(node)
        if node is None:
            return False
    return False


# ---------------------------------------------------------------------------------------------
# q, k, v back to their projections
# ---------------------------------------------------------------------------------------------

@dataclass
class Segment:
    """One stream's projection feeding q, k or v."""

    linear: fx.Node
    norm: fx.Node | None = None
    scale: float = 1.0


@dataclass
class Operand:
    segments: list[Segment]
    nodes: list[fx.Node] = field(default_factory=list)   # walked nodes (for the layout probe)
    rope: dict | None = None       # {"add", "t", "cos", "sin", "style"}
    cat: fx.Node | None = None
    sizes: list[int] = field(default_factory=list)       # token counts of the segments (joint)


def _in_place_write(node: fx.Node, gm) -> fx.Node | None:
    """A node writing into ``node``'s storage (``copy_``, ``mul_``, ``x[..] = y``), through views of
    it; None when nothing does. Pre-dispatch export and FX keep such writes (CogVideoX rotates
    the image tokens of q in place), and a walk along the data flow would not see them."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            target = user.target
            mutating = target is _setitem or (user.op == "call_method" and str(target).endswith("_")
                                              and not str(target).startswith("__"))
            schema = getattr(target, "_schema", None)
            if schema is not None and user.args and user.args[0] is n:
                mutating = mutating or bool(schema.arguments and schema.arguments[0].alias_info
                                            and schema.arguments[0].alias_info.is_write)
            if mutating and user.args and user.args[0] is n:
                return user
            if op_kind(user, gm) in ("view", "reshape", "permute", "transpose", "select", "slice", "unflatten",
                                     "flatten", "squeeze", "unsqueeze", "expand", "alias", "getitem",
                                     "split", "chunk", "unbind"):
                stack.append(user)
    return None


def _operand(traced, arg: fx.Node, name: str, allow_norm: bool, allow_rope: bool, depth: int = 0) -> Operand:
    gm = traced.gm
    nodes: list[fx.Node] = []
    scale, norm, rope = 1.0, None, None
    node = arg
    while True:
        if (write := _in_place_write(node, gm)) is not None:
            raise Miss(f"attention core found, but {name} is written in place ({write.name}: e.g. a rotary "
                       f"embedding applied to part of the tokens by slice assignment), which graftfx cannot "
                       f"carry into a region")
        kind = op_kind(node, gm)
        if kind in ("linear", "addmm"):
            return Operand([Segment(node, norm, scale)], nodes, rope)
        nodes.append(node)
        if kind in SHAPE_OPS or kind == "size":
            prev = first_tensor_arg(node)
        elif kind in ("mul", "div") and scalar_operand(node) is not None:
            value = scalar_operand(node)
            scale *= value if kind == "mul" else 1.0 / value
            prev = first_tensor_arg(node)
        elif allow_norm and kind in NORMS and norm is None:
            norm, prev = node, first_tensor_arg(node)
        elif kind == "add" and allow_rope and rope is None and (found := _rope(traced, node)) is not None:
            rope, prev = found, found["t"]
            nodes.pop()
        elif kind == "cat" and allow_rope and rope is None and (found := _partial_rope(traced, node)) is not None:
            rope, prev = found, found["t"]          # rotary on the first rot_dim channels (StableAudio)
            nodes.pop()
        elif kind in ("repeat_interleave", "aten::repeat_interleave") and name != "q" and _repeats_heads(node):
            prev = first_tensor_arg(node)           # grouped-query k/v: heads repeated (StableAudio)
        elif kind == "cat" and depth == 0:
            return _joint_operand(traced, node, name, nodes, scale, norm, rope, allow_norm)
        else:
            raise Miss(f"attention core found, but {name} comes from {kind} ({node.name}), not a projection")
        if prev is None:
            raise Miss(f"attention core found, but {name} comes from a graph input, not a projection")
        node = prev


def _joint_operand(traced, cat, name, nodes, scale, norm, rope, allow_norm) -> Operand:
    parts = [a for a in cat.args[0] if isinstance(a, fx.Node)]
    shape = node_shape(cat) or ()
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if len(shape) not in (3, 4) or len(parts) < 2:
        raise Miss(f"attention core found, but {name} comes from a concatenation ({cat.name}) graftfx cannot read")
    subs = [_operand(traced, p, name, allow_norm and norm is None, False, depth=1) for p in parts]
    segments = []
    for sub in subs:
        seg = sub.segments[0]
        segments.append(Segment(seg.linear, seg.norm or norm, seg.scale * scale))
    sizes = [(node_shape(p) or ())[dim % len(shape)] for p in parts]
    all_nodes = nodes + [cat] + [n for s in subs for n in s.nodes]
    return Operand(segments, all_nodes, rope, cat, sizes)


def _strip(node, gm):
    while isinstance(node, fx.Node) and op_kind(node, gm) in _CASTS:
        node = first_tensor_arg(node)
    return node


def _rope(traced, add: fx.Node) -> dict | None:
    """``t*cos + rot(t)*sin`` at ``add``: {"t", "cos", "sin", "style", "add", "rot_nodes"}."""
    gm = traced.gm
    terms = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(terms) != 2 or any(op_kind(t, gm) != "mul" for t in terms):
        return None
    muls = [[a for a in t.args[:2] if isinstance(a, fx.Node)] for t in terms]
    if any(len(m) != 2 for m in muls):
        return None
    for first, second in (terms, terms[::-1]):
        fa = [a for a in first.args[:2] if isinstance(a, fx.Node)]
        sa = [a for a in second.args[:2] if isinstance(a, fx.Node)]
        for a, cos in (fa, fa[::-1]):
            t = _strip(a, gm)
            for b, sin in (sa, sa[::-1]):
                rot = _strip(b, gm)
                if rot is t or _strip(cos, gm) is t or _strip(sin, gm) is t:
                    continue
                chain = _rot_chain(rot, t, gm)
                if chain is None:
                    continue
                style = _rope_style(traced, t, rot, chain)
                if style is None:
                    return None
                return {"t": t, "cos": cos, "sin": sin, "style": style, "add": add, "rot_nodes": chain}
    return None


def _partial_rope(traced, cat: fx.Node) -> dict | None:
    """``cat([rope(t[..., :r]), t[..., r:]], -1)``: a rotary embedding on the first ``r`` channels
    of each head (the rest pass unrotated): the rope record of ``t`` with ``rot_dim`` r, or None."""
    gm = traced.gm
    shape = node_shape(cat)
    parts = cat.args[0] if cat.args else ()
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not shape or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1 or len(parts) != 2:
        return None
    rotated, rest = (_strip(p, gm) for p in parts)
    if not all(isinstance(p, fx.Node) for p in (rotated, rest)) or op_kind(rotated, gm) != "add":
        return None
    found = _rope(traced, rotated)
    if found is None:
        return None
    head, tail = found["t"], rest
    source = first_tensor_arg(head)
    if source is None or first_tensor_arg(tail) is not source or not {op_kind(head, gm), op_kind(tail, gm)} <= {
            "slice", "getitem"}:
        return None
    d = shape[-1]
    ids = torch.arange(d, dtype=torch.float32).expand(*node_shape(source))
    try:
        got_head = probe_many([head], {source: ids}, gm, head).reshape(-1, node_shape(head)[-1])[0]
        got_tail = probe_many([tail], {source: ids}, gm, tail).reshape(-1, node_shape(tail)[-1])[0]
    except Exception:  # noqa: BLE001 - slices we cannot run are not ones we know
        return None
    r = got_head.numel()
    if not (torch.equal(got_head, torch.arange(r, dtype=torch.float32))
            and torch.equal(got_tail, torch.arange(r, d, dtype=torch.float32))):
        return None
    return {**found, "t": source, "add": cat, "rot_dim": r}


def _repeats_heads(node: fx.Node) -> bool:
    """``repeat_interleave(t, n, dim=1)`` with an integer count on a 4-d (B, H, L, Dh) tensor."""
    shape = node_shape(first_tensor_arg(node)) or ()
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    return len(shape) == 4 and isinstance(repeats, int) and dim in (1, -3)


def _rot_chain(rot: fx.Node, t: fx.Node, gm, limit: int = 16) -> list[fx.Node] | None:
    """Nodes from t to rot through moving/negating ops only (the rotation), or None."""
    found: list[fx.Node] = []
    seen = set()
    stack = [rot]
    while stack:
        n = stack.pop()
        if n is t or n in seen:
            continue
        seen.add(n)
        kind = op_kind(n, gm)
        if len(seen) > limit or (kind not in _ROT_OPS and not (kind == "mul" and scalar_operand(n) == -1.0)):
            return None
        found.append(n)
        for a in tensor_args(n):
            if op_kind(a, gm) == "size" or (a.op == "call_function" and getattr(a.target, "__name__", "") == "getattr"):
                continue
            stack.append(a)
    if t not in {a for n in found for a in tensor_args(n)}:
        return None
    order = {n: i for i, n in enumerate(t.graph.nodes)}
    return sorted(found, key=order.__getitem__)


def _rope_style(traced, t, rot, chain) -> str | None:
    """Which rotation ``rot(t)`` is, read by running it on 1..D along the last axis."""
    shape = node_shape(t)
    if not shape:
        return None
    d = shape[-1]
    x = torch.arange(1, d + 1, dtype=torch.float32)
    try:
        got = probe_many(chain, {t: x.expand(*shape)}, traced.gm, rot).reshape(-1, d)[0]
    except Exception:  # noqa: BLE001 - a rotation we cannot run is not one we know
        return None
    half = torch.cat([-x[d // 2:], x[: d // 2]])
    pairs = torch.stack([-x[1::2], x[0::2]], dim=-1).reshape(-1)
    if torch.equal(got, half):
        return "half"
    if torch.equal(got, pairs):
        return "interleaved"
    return None


# ---------------------------------------------------------------------------------------------
# Masks and additive terms
# ---------------------------------------------------------------------------------------------

def _classify(traced, node: fx.Node) -> str:
    """none | causal | bias | mask | causal+mask | causal+bias, for an attn_mask or a term."""
    value = static_values(traced, [node]).get(node)
    if depends_on_input(traced, node):         # a padding mask; causal too when it hides j > i
        if value is not None and value.dtype == torch.bool and _implies_causal(value):
            return "causal+mask"
        if value is not None and value.is_floating_point() and _masks_upper(value):
            return "causal+mask"
        return "mask"
    if value is None:
        return "mask"          # unknown values (meta device): never assume "no mask"
    if value.dtype == torch.bool:
        if bool(value.all()):
            return "none"
        if _is_causal_bool(value):
            return "causal"
        return "causal+mask" if _implies_causal(value) else "mask"
    value = value.float()
    if bool((value == 0).all()):
        return "none"
    if value.dim() >= 2 and value.shape[-1] == value.shape[-2]:
        upper = torch.triu(torch.ones(value.shape[-2:], dtype=torch.bool), 1)
        masked = bool((value[..., upper] <= -1e4).all())
        if masked and bool((value[..., ~upper] == 0).all()):
            return "causal"
        if masked:
            return "causal+bias"
    return "bias"


def _classify_fill(traced, cond: fx.Node, hidden_when_true: bool) -> str:
    """none | causal | mask | causal+mask for the condition of a masked_fill / where on the scores."""
    value = static_values(traced, [cond]).get(cond)
    if value is None or depends_on_input(traced, cond):
        return "mask"
    keep = ~value.bool() if hidden_when_true else value.bool()
    if bool(keep.all()):
        return "none"
    if _is_causal_bool(keep):
        return "causal"
    return "causal+mask" if _implies_causal(keep) else "mask"


def _masks_upper(value: torch.Tensor) -> bool:
    if value.dim() < 2 or value.shape[-1] != value.shape[-2]:
        return False
    upper = torch.triu(torch.ones(value.shape[-2:], dtype=torch.bool), 1)
    return bool((value[..., upper] <= -1e4).all())


def _is_causal_bool(value: torch.Tensor) -> bool:
    if value.dim() < 2 or value.shape[-1] != value.shape[-2]:
        return False
    tri = torch.tril(torch.ones(value.shape[-2:], dtype=torch.bool))
    return bool((value == tri).all())


def _implies_causal(value: torch.Tensor) -> bool:
    if value.dim() < 2 or value.shape[-1] != value.shape[-2]:
        return False
    upper = torch.triu(torch.ones(value.shape[-2:], dtype=torch.bool), 1)
    return not bool(value[..., upper].any())


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------

def analyse(traced: TracedGraph) -> tuple[list[Region], list[Candidate]]:
    """All attention regions of ``traced`` (every kind) and the cores that did not make one."""
    cache = analysis_cache(traced)
    if "attention" in cache:
        return cache["attention"]
    regions: list[Region] = []
    misses: list[Candidate] = []
    for found in _cores(traced):
        if isinstance(found, tuple):
            anchor, why = found
            misses.append(Candidate(_path_or_name(anchor), anchor.name, why))
            continue
        try:
            regions.append(_region(traced, found))
        except Miss as e:
            misses.append(Candidate(_path_or_name(found.anchor), found.anchor.name, str(e)))
        except (ValueError, RuntimeError, TypeError, IndexError, KeyError) as e:
            misses.append(Candidate(_path_or_name(found.anchor), found.anchor.name,
                                    f"attention core found, but its layout could not be read: {e}"))
    cache["attention"] = (regions, misses)
    return regions, misses


def _path_or_name(node: fx.Node) -> str:
    return module_path(node) or f"<graph {node.name}>"


def _scores(traced, core: Core, extra: dict, details: dict) -> bool:
    """Read the mask / additive terms into ``extra`` and ``details``; True when causal."""
    causal = core.causal
    if core.mask is not None:
        cls = _classify(traced, core.mask)
        causal = causal or cls.startswith("causal")
        if cls.endswith("mask"):
            extra["mask"] = core.mask
        elif cls == "causal+bias":
            raise Miss("attention core found, but its additive mask is causal plus a bias (ALiBi-style); "
                       "graftfx does not split the two")
        elif cls == "bias":
            extra["bias0"] = core.mask
            details["bias_steps"] = [("add", "bias0")]
    if core.steps:
        steps, counts = [], {"mask": 0, "bias": 0}
        for kind, item, *fill in core.steps:
            if kind == "view":
                steps.append(("view", (-1,) + tuple(item[1:])))
                continue
            if kind in ("fill", "keep"):
                cls = _classify_fill(traced, item, hidden_when_true=kind == "fill")
                if cls == "none":
                    continue
                if cls == "causal":             # the hidden scores weigh nothing, whatever the fill
                    causal = True
                    continue
                causal = causal or cls == "causal+mask"
                name = f"mask{counts['mask']}"
                counts["mask"] += 1
                extra[name] = item
                steps.append((kind, name, fill[0]))
                continue
            cls = _classify(traced, item)
            if cls == "none":
                continue
            if cls == "causal":
                causal = True
                continue
            if cls == "causal+bias":
                raise Miss("attention core found, but an additive term is causal plus a bias; "
                           "graftfx does not split the two")
            causal = causal or cls == "causal+mask"
            group = "mask" if cls.endswith("mask") else "bias"
            name = f"{group}{counts[group]}"
            counts[group] += 1
            extra[name] = item
            steps.append(("add", name))
        if any(step[0] != "view" for step in steps):
            details["bias_steps"] = steps
    return causal


def _region(traced: TracedGraph, core: Core) -> Region:
    gm = traced.gm
    extra: dict[str, fx.Node] = {}
    details: dict = {}
    causal = _scores(traced, core, extra, details)
    ops = {}
    for name, arg in (("q", core.q), ("k", core.k), ("v", core.v)):
        ops[name] = _operand(traced, arg, name, allow_norm=name != "v", allow_rope=name != "v")
    if len({len(o.segments) for o in ops.values()}) != 1:
        raise Miss("attention core found, but q, k and v are concatenations of different streams")
    if ops["q"].rope is None and ops["k"].rope is not None:
        raise Miss("attention core found, but only k carries a rotary embedding")
    if len(ops["q"].segments) == 1:
        x_q, x_k, x_v = (linear_input(ops[n].segments[0].linear, gm) for n in "qkv")
        if x_k is not x_v:
            raise Miss("attention core found, but k and v come from different inputs")
        if x_q is x_k:
            streams = [x_q]
            origin = stream_origin(traced, x_q)
            if origin.joints:
                kind = JOINT_ATTENTION
                details["segments"], details["x_grid"] = _joined_segments(traced, origin.joints[0])
            else:
                kind = CAUSAL_SELF_ATTENTION if causal else SELF_ATTENTION
        else:
            streams, kind = [x_q, x_k], CROSS_ATTENTION
        if causal and kind != CAUSAL_SELF_ATTENTION:
            raise Miss(f"attention core found, but it is causal {kind.replace('_', ' ')} (not a kind graftfx replaces)")
    else:
        streams, kind = _joint_streams(ops, gm), JOINT_ATTENTION
        if causal:
            raise Miss("attention core found, but it is causal joint attention (not a kind graftfx replaces)")
    return _build(traced, kind, core, ops, streams, extra, details)


def _joined_segments(traced, cat: fx.Node):
    """Segments of a stream joined before the block (Flux's single blocks): the operand with a
    token grid (or else the longest) is the image stream "x", the others "context"."""
    parts = [a for a in cat.args[0] if isinstance(a, fx.Node)]
    sizes = [(node_shape(p) or (0, 0))[1] for p in parts]
    grids = [region_grid(traced, p, n) for p, n in zip(parts, sizes)]
    main = next((i for i, g in enumerate(grids) if g), max(range(len(sizes)), key=sizes.__getitem__))
    return [("x" if i == main else "context", n) for i, n in enumerate(sizes)], grids[main]


def _joint_streams(ops, gm) -> list[fx.Node]:
    """The input of each segment (the same for q, k, v), in sequence order."""
    sizes = ops["q"].sizes
    if ops["k"].sizes != sizes or ops["v"].sizes != sizes:
        raise Miss("attention core found, but q, k and v concatenate streams of different lengths")
    inputs = []
    for i in range(len(sizes)):
        xs = {linear_input(ops[n].segments[i].linear, gm) for n in "qkv"}
        if len(xs) != 1:
            raise Miss("attention core found, but one stream's q, k, v come from different inputs")
        inputs.append(xs.pop())
    if len(inputs) != 2:
        raise Miss(f"attention core found, but it joins {len(inputs)} streams (graftfx reads two)")
    return inputs


def _main_stream(traced, streams, ops) -> int:
    """Which of two joint streams is the token (image) stream ``x``: the one with a token grid,
    else the one whose projections are not named as the added/context stream, else the longer."""
    grids = [bool(stream_origin(traced, s).grids) for s in streams]
    if grids[0] != grids[1]:
        return grids.index(True)
    names = [module_path(ops["q"].segments[i].linear).rsplit(".", 1)[-1] for i in range(2)]
    added = [any(w in n for w in ("add", "context", "txt")) for n in names]
    if added[0] != added[1]:
        return added.index(False)
    sizes = ops["q"].sizes
    return 0 if sizes[0] >= sizes[1] else 1


def _forward_outputs(traced, core: Core, sizes: list[int]):
    """From the core output to the output projection(s): one (linear, crossed, piece) per stream
    in sequence order. linear None: the stream leaves without a projection (piece: the merged
    heads) or has no output at all (piece None)."""
    gm = traced.gm
    crossed: list[fx.Node] = []
    node = core.out
    while True:
        users = [u for u in node.users if not is_side_effect(u)]
        if len(sizes) > 1 and users:
            pieces = _token_split(node, users, sizes, gm)
            if pieces is not None:
                outs = []
                for piece in pieces:
                    if piece is None:
                        outs.append((None, [], None))
                        continue
                    if not [u for u in piece.users if not is_side_effect(u)]:
                        outs.append((None, [], None))   # the stream's output is unused (SD3's last block)
                        continue
                    lin, more, why = walk_forward(piece, gm)
                    if lin is None:
                        raise Miss(f"attention core found, but a stream has no output projection: {why}")
                    outs.append((lin, crossed + _piece_chain(piece, node) + more, piece))
                return outs
        if len(users) != 1:
            raise Miss(f"attention core found, but no output projection: {node.name} has {len(users)} users")
        user = users[0]
        kind = op_kind(user, gm)
        if kind in ("linear", "addmm") and linear_input(user, gm) is node and len(sizes) <= 1:
            return [(user, crossed, None)]
        if kind not in SHAPE_OPS:
            if len(sizes) <= 1 and crossed and len(node_shape(node) or ()) == 3:
                return [(None, crossed, node)]        # merged heads leave without a projection
            raise Miss(f"attention core found, but no output projection: {node.name} flows into {kind} ({user.name})")
        crossed.append(user)
        node = user


def _piece_chain(piece: fx.Node, base: fx.Node) -> list[fx.Node]:
    chain = []
    node = piece
    while node is not base and isinstance(node, fx.Node):
        chain.insert(0, node)
        node = first_tensor_arg(node)
    return chain


def _token_split(node, users, sizes, gm):
    """Users of ``node`` (B, Ltot, D) that cut it back into the streams along the token axis."""
    shape = node_shape(node)
    if not shape or len(shape) != 3 or shape[1] != sum(sizes):
        return None
    bounds = [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
    pieces: list = [None] * len(sizes)
    for u in users:
        if op_kind(u, gm) == "split" and u.op == "call_function":
            parts = u.args[1]
            dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
            if dim % 3 != 1 or not isinstance(parts, (list, tuple)) or list(parts) != list(sizes):
                return None
            for g in u.users:
                if op_kind(g, gm) == "getitem":
                    pieces[g.args[1]] = g
            continue
        span = _token_slice(u, gm, shape[1])
        if span is None or span[1] not in bounds:
            return None
        pieces[bounds.index(span[1])] = span[0]
    return pieces


def _token_slice(u, gm, total):
    """(piece node, (start, stop)) for a slice of the token axis (through a full slice of dim 0)."""
    node = u
    if op_kind(node, gm) == "slice" and node.args[1] == 0 and len(node.users) == 1:
        node = next(iter(node.users))
    if op_kind(node, gm) == "slice" and node.op == "call_function" and len(node.args) >= 3 and node.args[1] == 1:
        start = node.args[2] if node.args[2] is not None else 0
        stop = node.args[3] if len(node.args) > 3 and node.args[3] is not None else total
        if not isinstance(start, int) or not isinstance(stop, int):
            return None
        return node, (int(start), int(min(stop, total)))
    if op_kind(node, gm) == "getitem" and node.op == "call_function":
        idx = node.args[1]
        if isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None) and isinstance(idx[1], slice):
            s = idx[1]
            if not all(isinstance(v, (int, type(None))) for v in (s.start, s.stop)):
                return None
            return node, (s.start or 0, min(s.stop if s.stop is not None else total, total))
    return None


def _build(traced, kind, core: Core, ops, streams, extra, details) -> Region:
    gm = traced.gm
    joint2 = len(streams) == 2 and kind == JOINT_ATTENTION
    n_seg = len(ops["q"].segments)
    main = _main_stream(traced, streams, ops) if joint2 else 0
    order = [main, 1 - main] if joint2 else [0]
    prefix = {main: "", 1 - main: "context_"} if joint2 else {0: ""}
    weights: dict[str, torch.Tensor] = {}
    heads = head_dim = tokens_total = None
    for name in "qkv":
        op = ops[name]
        through = {op.rope["add"]: op.rope["t"]} if op.rope else {}
        seeds = {s.linear: channel_ids(node_shape(s.linear)) for s in op.segments}
        chain = op.nodes + ([op.rope["add"]] if op.rope else [])
        ids = probe_many(chain, seeds, gm, _core_arg(core, name), through=through)
        if ids.dim() == 3:  # (B*H, L, Dh): heads folded into the batch
            batch = node_shape(streams[0])[0]
            ids = ids.reshape(batch, ids.shape[0] // batch, ids.shape[1], ids.shape[2])
        if core.gqa and name != "q" and heads and ids.shape[1] < heads and heads % ids.shape[1] == 0:
            ids = ids.repeat_interleave(heads // ids.shape[1], dim=1)   # what SDPA's enable_gqa does
        h, length, dh = ids.shape[1], ids.shape[2], ids.shape[3]
        bounds = list(_cumsum(op.sizes)) if n_seg > 1 else [length]
        for i in order:
            seg = op.segments[i]
            start, end = (bounds[i - 1] if i else 0), bounds[i]
            rows = ids[0, :, start, :].reshape(-1).long()
            if not torch.equal(ids[0, :, end - 1, :].reshape(-1).long(), rows):
                raise ValueError(f"{name} rows differ between tokens")
            _, w, b = linear_params(seg.linear, gm)
            key = prefix[i] + name
            weights[f"{key}.weight"] = w.detach()[rows] if not w.is_meta else w.detach().new_empty((rows.numel(), w.shape[1]))
            if b is not None:
                weights[f"{key}.bias"] = b.detach()[rows] if not b.is_meta else b.detach().new_empty(rows.numel())
            if name != "v":
                details[f"{key}_norm"] = _norm_facts(seg.norm, gm)
                if seg.norm is not None:
                    weights.update({f"{key}_norm.{k}": t.detach() for k, t in _norm_params(seg.norm, gm).items()})
        if name == "q":
            heads, head_dim, tokens_total = h, dh, length
        elif (h, dh) != (heads, head_dim):
            raise Miss(f"attention core found, but {name} has {h} heads of {dh} (q: {heads} of {head_dim})")
    q_scale, k_scale = ops["q"].segments[0].scale, ops["k"].segments[0].scale
    if any(s.scale != q_scale for s in ops["q"].segments) or any(s.scale != k_scale for s in ops["k"].segments):
        raise Miss("attention core found, but the streams' q/k are scaled differently")
    total_scale = q_scale * k_scale * (core.scale if core.scale is not None else 1.0 / math.sqrt(head_dim))
    # Output side: one projection per stream (joint), or the merged heads themselves.
    outs = _forward_outputs(traced, core, ops["q"].sizes if joint2 else [])
    out_nodes: dict[int, fx.Node] = {}
    projections = []
    details["out_proj"] = True
    for i, (lin, crossed, piece) in enumerate(outs):
        if lin is None and piece is None:
            continue                                   # a stream without an output (SD3's last block)
        key = prefix[i] + "out"
        seed = _head_ids(node_shape(core.out), heads, head_dim)
        target = linear_input(lin, gm) if lin is not None else piece
        cols = probe_many(crossed, {core.out: seed}, gm, target)
        cols = cols.reshape(-1, cols.shape[-1])[0].long()
        if lin is None:
            if not torch.equal(cols, torch.arange(cols.numel())):
                raise Miss("attention core found, but its merged heads leave without a projection, in another order")
            out_nodes[i] = piece
            details["out_proj"] = False
            continue
        _, w_o, b_o = linear_params(lin, gm)
        perm = torch.empty_like(cols)
        perm[cols] = torch.arange(cols.numel())
        weights[f"{key}.weight"] = w_o.detach()[:, perm] if not w_o.is_meta else w_o.detach()
        if b_o is not None:
            weights[f"{key}.bias"] = b_o.detach()
        out_nodes[i] = lin
        projections.append(lin)
    if main not in out_nodes:
        raise Miss("attention core found, but the token stream has no output")
    x = streams[main]
    context = streams[1 - main] if len(streams) == 2 else None
    extra_inputs = dict(extra)
    rope = ops["q"].rope
    if rope is not None:
        layout = _layout(node_shape(rope["t"]), heads, tokens_total, head_dim)
        if layout is None:
            raise Miss("attention core found, but its rotary embedding acts on part of the head dim or on a "
                       "layout graftfx cannot read")
        extra_inputs.update(q_cos=rope["cos"], q_sin=rope["sin"])
        k_rope = ops["k"].rope
        if k_rope is not None:
            k_shape = node_shape(k_rope["t"])
            k_tokens, k_heads = (k_shape[2], k_shape[1]) if layout == "BHLD" else (k_shape[1], k_shape[2])
            # grouped-query attention rotates k before repeating its heads: the same per head
            k_layout = _layout(k_shape, k_heads, k_tokens, head_dim) if heads % max(k_heads, 1) == 0 else None
            if k_rope["style"] != rope["style"] or k_layout != layout:
                raise Miss("attention core found, but q and k are rotated differently")
            extra_inputs.update(k_cos=k_rope["cos"], k_sin=k_rope["sin"])
            if k_rope.get("rot_dim") != rope.get("rot_dim"):
                raise Miss("attention core found, but q and k are rotated on different channels")
        details["rope"] = {"style": rope["style"], "layout": layout, "k": k_rope is not None}
        if rope.get("rot_dim") is not None:
            details["rope"]["rot_dim"] = rope["rot_dim"]
    if joint2:
        sizes = ops["q"].sizes
        details["segments"] = [("x" if i == main else "context", sizes[i]) for i in range(2)]
        details["context_tokens"] = sizes[1 - main]
    if context is not None:
        details["context_width"] = node_shape(context)[-1]
    x_shape = node_shape(x)
    tokens = x_shape[1] if joint2 else tokens_total
    extra_outputs = {"context": out_nodes[1 - main]} if joint2 and (1 - main) in out_nodes else {}
    output = out_nodes[main]
    inputs = list(streams) + list(extra_inputs.values())
    nodes = _nodes(inputs, [output, *extra_outputs.values()])
    path = common_path([module_path(s.linear) for n in "qkv" for s in ops[n].segments]
                       + [module_path(p) for p in projections] + [module_path(core.node)]) or module_path(core.node)
    details.update({
        "scale": total_scale, "core": core.anchor.name, "explicit_softmax": core.explicit,
        "scores_rank": len(node_shape(core.node) or ()) if core.explicit else 4,
        "qkv_fused": len({ops[n].segments[order[0]].linear for n in "qkv"}) == 1,
    })
    if kind == CAUSAL_SELF_ATTENTION:
        details["causal"] = True
    if kind == JOINT_ATTENTION:
        details["joint_streams"] = 2 if joint2 else 1
    return Region(
        path=path, kind=kind, pattern=kind, input=x, output=output, nodes=nodes, context=context,
        width=x_shape[-1], out_width=node_shape(output)[-1], tokens=tokens,
        grid=region_grid(traced, x, tokens), heads=heads, head_dim=head_dim, block_index=block_index(path),
        weights=weights, params=count_params(params_of(nodes, gm).values()),
        flops=graph_flops(gm, traced.batch_size, nodes), dtype=node_dtype(x), details=details,
        extra_inputs=extra_inputs, extra_outputs=extra_outputs,
    )


def _cumsum(sizes):
    total = 0
    for s in sizes:
        total += s
        yield total


def _layout(shape, heads, tokens, head_dim) -> str | None:
    """How q sits where the rotary tables meet it: (B, H, L, Dh) or (B, L, H, Dh)."""
    if not shape or len(shape) != 4 or shape[3] != head_dim:
        return None
    if (shape[1], shape[2]) == (heads, tokens):
        return "BHLD"
    if (shape[1], shape[2]) == (tokens, heads):
        return "BLHD"
    return None


def _nodes(inputs, outputs) -> tuple[fx.Node, ...]:
    found: dict[fx.Node, None] = {}
    for out in outputs:
        for n in region_nodes(inputs, out):
            found[n] = None
    order = {n: i for i, n in enumerate(outputs[0].graph.nodes)}
    return tuple(sorted(found, key=order.__getitem__))


def _core_arg(core: Core, name: str) -> fx.Node:
    return {"q": core.q, "k": core.k, "v": core.v}[name]


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
    if region.kind == CAUSAL_SELF_ATTENTION:
        return "attention found, but it is causal (causal_self_attention)"
    return f"attention found, but it is {region.kind}, not {wanted}"


register_pattern(SELF_ATTENTION, _report(SELF_ATTENTION),
                 "q, k, v projected from one input; SDPA or softmax(QK^T*s [+bias])V; output projection")
register_pattern(CAUSAL_SELF_ATTENTION, _report(CAUSAL_SELF_ATTENTION),
                 "self-attention whose mask (or is_causal) lets token i see tokens j <= i only")
register_pattern(CROSS_ATTENTION, _report(CROSS_ATTENTION),
                 "q from the tokens, k and v from a second input (e.g. text); output projection")
register_pattern(JOINT_ATTENTION, _report(JOINT_ATTENTION),
                 "attention over concatenated token streams (MMDiT: per-stream q/k/v, or one joint stream)")
