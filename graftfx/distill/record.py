"""Record what the teacher's regions see and produce: one forward pass feeds every region.

Runs the ORIGINAL traced graph (not the grafted one) through an ``fx.Interpreter`` and keeps
each selected region's boundary values: input, context (cross-attention) and output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from graftfx.match.region import Region
from graftfx.trace.tracer import TracedGraph, flatten_export_inputs


@dataclass(frozen=True)
class Tap:
    """Which graph nodes to keep for one region, under the region's path."""

    path: str
    input: str
    output: str
    context: str | None = None

    @classmethod
    def of(cls, region: Region) -> "Tap":
        return cls(region.path, region.input.name, region.output.name,
                   region.context.name if region.context is not None else None)


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
    """{path: {"input": x, "output": y[, "context": c]}} for one batch of model inputs."""
    kwargs = kwargs or {}
    wanted = {t.input for t in taps} | {t.output for t in taps} | {t.context for t in taps if t.context}
    rec = _Recorder(traced.gm, wanted)
    if traced.tracer == "export":
        rec.run(*flatten_export_inputs(traced.gm, tuple(args), kwargs))
    else:
        rec.run(*args)
    out = {}
    for t in taps:
        item = {"input": rec.kept[t.input], "output": rec.kept[t.output]}
        if t.context:
            item["context"] = rec.kept[t.context]
        out[t.path] = item
    return out
