"""Record what the teacher's regions see and produce: one forward pass feeds every region.

Runs the ORIGINAL traced graph (not the grafted one) through an ``fx.Interpreter`` and keeps
each selected region's boundary values: input, context (cross-attention) and output, and the
region's extra inputs (``in:mask``, ``in:bias0``, ``in:q_cos``, ...) and extra outputs
(``out:context``, joint attention's text stream).

An extra input either has a row per sample (a key-padding mask: it depends on the model's inputs
and its first dimension is the batch) or is the same for every sample (a relative-position bias,
rotary tables): ``Tap.batched`` names the first kind, decided from the traced graph. The second
kind is kept once (``constant``), and a later batch that differs is an error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from graftfx.match.region import Region
from graftfx.trace.tracer import TracedGraph, flatten_export_inputs, node_shape


@dataclass(frozen=True)
class Tap:
    """Which graph nodes to keep for one region, under the region's path."""

    path: str
    input: str
    output: str
    context: str | None = None
    extras: tuple[tuple[str, str], ...] = ()         # (name, node): the region's extra inputs
    extra_outputs: tuple[tuple[str, str], ...] = ()  # (name, node): its outputs after the first
    batched: frozenset[str] = frozenset()            # extras with one row per sample

    @classmethod
    def of(cls, region: Region) -> "Tap":
        return cls(region.path, region.input.name, region.output.name,
                   region.context.name if region.context is not None else None,
                   tuple((k, n.name) for k, n in region.extra_inputs.items()),
                   tuple((k, n.name) for k, n in region.extra_outputs.items()),
                   frozenset(k for k, n in region.extra_inputs.items() if per_sample(n, region)))

    def fields(self) -> dict[str, str]:
        """Cache field name -> graph node, per-sample fields only."""
        out = {"input": self.input, "output": self.output}
        if self.context:
            out["context"] = self.context
        out.update({f"in:{k}": n for k, n in self.extras if k in self.batched})
        out.update({f"out:{k}": n for k, n in self.extra_outputs})
        return out

    def constants(self) -> dict[str, str]:
        """Field name -> graph node of the extras that are the same for every sample."""
        return {f"in:{k}": n for k, n in self.extras if k not in self.batched}


def per_sample(node: fx.Node, region: Region) -> bool:
    """Whether ``node`` has a row per sample: it depends on a graph input and its first dimension
    is the batch (the region input's first dimension at the traced example)."""
    shape, batch = node_shape(node), node_shape(region.input)
    val = node.meta.get("val")
    if val is not None and getattr(val, "ndim", 0) and isinstance(val.shape[0], torch.SymInt):
        return True   # torch.export: a symbolic first dimension is the batch
    if not shape or not batch or shape[0] != batch[0]:
        return False
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.op == "placeholder":
            return True
        for m in n.all_input_nodes:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return False


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.kept: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted:
            self.kept[n.name] = out
        return out


@torch.no_grad()
def record(traced: TracedGraph, taps: list[Tap], args=(), kwargs=None) -> dict[str, dict[str, torch.Tensor]]:
    """{path: {"input": x, "output": y[, "context": c, "in:NAME": ..., "out:NAME": ...]}} for one
    batch of model inputs (constant extras included, without a batch dimension)."""
    kwargs = kwargs or {}
    wanted = {n for t in taps for n in (*t.fields().values(), *t.constants().values())}
    rec = _Recorder(traced.gm, wanted)
    if traced.tracer == "export":
        rec.run(*flatten_export_inputs(traced.gm, tuple(args), kwargs))
    else:
        rec.run(*args)
    return {t.path: {f: rec.kept[n] for f, n in {**t.fields(), **t.constants()}.items()} for t in taps}
