"""``trace(model, example_inputs)``: an FX graph whose every node knows its module path and shape.

Fast path ``torch.fx.symbolic_trace``; fallback ``torch.export`` (non-strict) with a dynamic
batch dimension for models FX cannot trace (diffusers transformers). Either way the batch
dimension stays symbolic, so the traced and rewritten graphs run at other batch sizes. The
export exports two blocks of each stack of identical blocks and repeats the second's graph for
the rest (``graftfx.trace.repeats``; ``repeats=False`` exports every block).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graftfx.errors import GraftError

from .meta import DTYPE, PATH, SHAPE, SHAPES_RECORDED, normalise_path



@dataclass
class TracedGraph:
    """A traced model: the graph module plus what matching and splicing need to know."""

    gm: fx.GraphModule
    tracer: str                       # "fx" or "export"
    model: nn.Module                  # the original model (its weights are shared, not copied)
    args: tuple
    kwargs: dict
    grid: tuple[int, int] | None      # token grid (H, W), when the model says
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def batch_size(self) -> int:
        for a in list(self.args) + list(self.kwargs.values()):
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                return int(a.shape[0])
        return 1

    @property
    def on_meta(self) -> bool:
        return any(p.is_meta for p in self.model.parameters())


def module_path(node: fx.Node) -> str:
    return node.meta.get(PATH, "")


def node_dtype(node: fx.Node) -> torch.dtype:
    """The dtype recorded at the example inputs (float32 when none was recorded)."""
    return node.meta.get(DTYPE, torch.float32)


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    shape = node.meta.get(SHAPE)
    return shape if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape) else None


def trace(model: nn.Module, example_inputs: tuple | list = (), example_kwargs: dict | None = None, *,
          tracer: str = "auto", grid: tuple[int, int] | None = None, repeats: bool = True) -> TracedGraph:
    """Trace ``model`` at ``example_inputs`` (batch >= 2 so the batch dimension stays symbolic).

    ``tracer``: "auto" (FX, then export), "fx" or "export". The model may live on the meta
    device (nothing is materialised). ``repeats``: on the export path, export each stack of
    identical blocks as two blocks and repeat block 1's graph for the rest (graftfx.trace.repeats;
    ``False`` exports every block). Raises ``GraftError`` naming both failures when neither
    tracer can handle the model.
    """
    if tracer not in ("auto", "fx", "export"):
        raise GraftError(f"tracer={tracer!r} is not one of auto, fx, export")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    start = time.perf_counter()
    errors: dict[str, str] = {}
    notes: list[str] = []
    gm = None
    used = ""
    if tracer in ("auto", "fx") and not kwargs:
        try:
            gm = fx.symbolic_trace(model, concrete_args=_fx_defaults(model, len(args)) or None)
            used = "fx"
        except Exception as e:  # noqa: BLE001 - any tracing failure means: try the next tracer
            errors["torch.fx.symbolic_trace"] = _one_line(e)
    elif tracer == "fx":
        errors["torch.fx.symbolic_trace"] = "keyword example inputs need the export tracer"
    if gm is None and tracer in ("auto", "export"):
        try:
            gm = _export(model, args, kwargs, notes, repeats)
            used = "export"
        except Exception as e:  # noqa: BLE001
            errors["torch.export (non-strict)"] = _one_line(e)
    if gm is None:
        detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise GraftError(f"cannot trace {type(model).__name__}: {detail}. Fix: make forward traceable "
                         "(no data-dependent Python control flow) or pass example inputs it accepts")
    traced = TracedGraph(gm, used, model, args, kwargs, grid or _infer_grid(model))
    traced.notes.extend(notes)
    if errors:
        traced.notes.append("fell back to torch.export: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    annotate_paths(gm)
    if not gm.meta.get(SHAPES_RECORDED):   # the repeats shortcut records them on the short graph
        propagate_shapes(traced)
    traced.seconds = time.perf_counter() - start
    return traced


def _fx_defaults(model: nn.Module, given: int) -> dict:
    """Parameters of ``forward`` after the ``given`` positional example inputs, at their defaults.

    ``torch.fx.symbolic_trace`` makes every parameter a placeholder, so ``attn_mask=None`` becomes
    a tensor-like proxy and ``if attn_mask is not None`` takes the masked branch (timm). Tracing
    with the defaults concrete specialises the graph to the call the example inputs make.
    """
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params[given:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        if p.default is None or isinstance(p.default, (bool, int, float, str)):
            out[p.name] = p.default
    return out


def _batch_of(value) -> int | None:
    """Dim 0 of the first tensor in ``value`` (args, kwargs, nested tuples/lists/dicts)."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() > 0 else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _batch_of(item)
        if found is not None:
            return found
    return None


def _dynamic_spec(value, batch: int | None):
    """export's dynamic_shapes for one input: dim 0 dynamic only on tensors whose dim 0 is the
    batch (a RoPE table of shape (L, D) or Flux's (L, 3) ids stay static), recursing into
    tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        if batch is not None and value.dim() > 0 and int(value.shape[0]) == batch:
            return {0: torch.export.Dim.DYNAMIC}
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(_dynamic_spec(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: _dynamic_spec(v, batch) for k, v in value.items()}
    return None


def _export(model: nn.Module, args: tuple, kwargs: dict, notes: list[str], repeats: bool = True) -> fx.GraphModule:
    import inspect

    call = (args, dict(kwargs))
    batch = _batch_of((args, kwargs))
    params = inspect.signature(model.forward).parameters
    var_kw = next((p.name for p in params.values() if p.kind == inspect.Parameter.VAR_KEYWORD), None)
    # export's dynamic_shapes mirrors the call by parameter name. Keywords that only **kwargs
    # takes trip torch.export's own bookkeeping of dynamic shapes, so constants among them
    # (return_dict=False, use_cache=False) are bound at trace time instead, and said so.
    extra = {k: v for k, v in kwargs.items() if k not in params or params[k].kind == inspect.Parameter.VAR_KEYWORD}
    fixed = {k: v for k, v in extra.items() if not _has_tensor(v)} if var_kw else {}
    if set(extra) - set(fixed):
        names = ", ".join(sorted(set(extra) - set(fixed)))
        raise ValueError(f"tensor keyword inputs {names} go to **{var_kw}, which torch.export cannot trace with a "
                         "dynamic batch; pass them as named parameters of forward")
    kwargs = {k: v for k, v in kwargs.items() if k not in fixed}
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    spec = {name: _dynamic_spec(value, batch) for name, value in bound.arguments.items()}

    def export() -> fx.GraphModule:
        hook = (model.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, **fixed}), with_kwargs=True)
                if fixed else None)
        try:
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False).module()
        finally:
            if hook is not None:
                hook.remove()
        return _without_metadata_asserts(exported)

    gm = None
    if repeats:
        from .repeats import export_with_repeats

        on_meta = any(p.is_meta for p in model.parameters())
        gm = export_with_repeats(model, export, *call, notes,
                                 prepare=lambda short: record_shapes(short, "export", *call, on_meta))
    if gm is None:
        gm = export()
    if fixed:
        notes.append("fixed at trace time (keywords of **" + var_kw + "): "
                     + ", ".join(f"{k}={v!r}" for k, v in fixed.items()) + "; call the traced model without them")
    return gm


def _without_metadata_asserts(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` without export's ``aten._assert_tensor_metadata`` checks: export pins the dtype and
    device of every tensor the model casts (``x.to(q.dtype)``), which would refuse the graph under
    autocast or at another dtype (bf16 FSDP, ``pipe.to(torch.bfloat16)``). They compute nothing;
    the casts themselves stay."""
    check = torch.ops.aten._assert_tensor_metadata.default
    dropped = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is check and not n.users]
    for node in dropped:
        gm.graph.erase_node(node)
    if dropped:
        gm.recompile()
    return gm


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


def annotate_paths(gm: fx.GraphModule) -> None:
    """Set ``node.meta[PATH]`` for every node: the innermost module that produced it."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            path = node.target
        elif node.op == "get_attr":
            path = node.target.rsplit(".", 1)[0] if "." in node.target else ""
        else:
            stack = node.meta.get("nn_module_stack") or {}
            path = normalise_path(list(stack.values())[-1][0]) if stack else ""
        node.meta[PATH] = path


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[SHAPE] = tuple(int(s) for s in result.shape)
            n.meta[DTYPE] = result.dtype
        elif isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result):
            n.meta[SHAPE] = None
            n.meta["graftfx_shapes"] = [tuple(int(s) for s in r.shape) for r in result]
        return result


def propagate_shapes(traced: TracedGraph) -> None:
    """Run the graph once at the example inputs (on meta when the model is), recording shapes."""
    record_shapes(traced.gm, traced.tracer, traced.args, traced.kwargs, traced.on_meta)


def record_shapes(gm: fx.GraphModule, tracer: str, args: tuple, kwargs: dict, on_meta: bool) -> None:
    if on_meta:
        args = tuple(_to_meta(a) for a in args)
        kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
    with torch.no_grad():
        if tracer == "export":
            _ShapeRecorder(gm).run(*flatten_export_inputs(gm, args, kwargs))
        else:
            _ShapeRecorder(gm).run(*args)


def flatten_export_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The placeholder values of an exported graph for a call ``gm(*args, **kwargs)``."""
    from torch.fx._pytree import tree_flatten_spec

    return tree_flatten_spec((args, kwargs), gm.graph._codegen.pytree_info.in_spec)


def _to_meta(x: Any) -> Any:
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def _infer_grid(model: nn.Module) -> tuple[int, int] | None:
    cfg = getattr(model, "config", None)
    grid = getattr(cfg, "grid", None)
    if isinstance(grid, tuple):
        return grid
    size, patch = getattr(cfg, "sample_size", None), getattr(cfg, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        h = w = size // patch
        height = getattr(cfg, "height", None)
        if isinstance(height, int):
            h = height // patch
        return (h, w)
    return None


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__
