"""``trace(model, example_inputs)``: an FX graph whose every node knows its module path and shape.

Fast path ``torch.fx.symbolic_trace``; fallback ``torch.export`` (non-strict) with a dynamic
batch dimension for models FX cannot trace (diffusers transformers). Either way the batch
dimension stays symbolic, so the traced and rewritten graphs run at other batch sizes.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graftfx.errors import GraftError

PATH = "graftfx_path"    # node.meta key: module path the node came from ("" at the root)
SHAPE = "graftfx_shape"  # node.meta key: output shape at the example inputs (tuple) or None
DTYPE = "graftfx_dtype"


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
          tracer: str = "auto", grid: tuple[int, int] | None = None) -> TracedGraph:
    """Trace ``model`` at ``example_inputs`` (batch >= 2 so the batch dimension stays symbolic).

    ``tracer``: "auto" (FX, then export), "fx" or "export". The model may live on the meta
    device (nothing is materialised). Raises ``GraftError`` naming both failures when neither
    tracer can handle the model.
    """
    if tracer not in ("auto", "fx", "export"):
        raise GraftError(f"tracer={tracer!r} is not one of auto, fx, export")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    start = time.perf_counter()
    errors: dict[str, str] = {}
    gm = None
    used = ""
    if tracer in ("auto", "fx") and not kwargs:
        try:
            gm = fx.symbolic_trace(model)
            used = "fx"
        except Exception as e:  # noqa: BLE001 - any tracing failure means: try the next tracer
            errors["torch.fx.symbolic_trace"] = _one_line(e)
    elif tracer == "fx":
        errors["torch.fx.symbolic_trace"] = "keyword example inputs need the export tracer"
    if gm is None and tracer in ("auto", "export"):
        try:
            gm = _export(model, args, kwargs)
            used = "export"
        except Exception as e:  # noqa: BLE001
            errors["torch.export (non-strict)"] = _one_line(e)
    if gm is None:
        detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise GraftError(f"cannot trace {type(model).__name__}: {detail}. Fix: make forward traceable "
                         "(no data-dependent Python control flow) or pass example inputs it accepts")
    traced = TracedGraph(gm, used, model, args, kwargs, grid or _infer_grid(model))
    if errors:
        traced.notes.append("fell back to torch.export: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    annotate_paths(gm)
    propagate_shapes(traced)
    traced.seconds = time.perf_counter() - start
    return traced


def _export(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    batch = torch.export.Dim.DYNAMIC

    def dims(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return {0: batch}
        return None

    dynamic = {"args": tuple(dims(a) for a in args), "kwargs": {k: dims(v) for k, v in kwargs.items()}}
    # export's dynamic_shapes mirrors the call: positional names come from the signature.
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    spec = {params[i]: d for i, d in enumerate(dynamic["args"])}
    spec.update(dynamic["kwargs"])
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False)
    return ep.module()


_BRACKETS = re.compile(r"\[(\d+)\]")


def _normalise_path(path: str) -> str:
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = _BRACKETS.sub(r".\1", path)
    return path.strip(".")


def annotate_paths(gm: fx.GraphModule) -> None:
    """Set ``node.meta[PATH]`` for every node: the innermost module that produced it."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            path = node.target
        elif node.op == "get_attr":
            path = node.target.rsplit(".", 1)[0] if "." in node.target else ""
        else:
            stack = node.meta.get("nn_module_stack") or {}
            path = _normalise_path(list(stack.values())[-1][0]) if stack else ""
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
    args, kwargs = traced.args, traced.kwargs
    if traced.on_meta:
        args = tuple(_to_meta(a) for a in args)
        kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
    with torch.no_grad():
        if traced.tracer == "export":
            _ShapeRecorder(traced.gm).run(*flatten_export_inputs(traced.gm, args, kwargs))
        else:
            _ShapeRecorder(traced.gm).run(*args)


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
