"""User patterns: a Python function whose traced graph is matched exactly, as torch.fx's
subgraph rewriter does (same ops, same structure; placeholders match any node).

    @graftfx.rewrites.patterns.user.pattern("my_mlp")
    def my_mlp(x, w1, b1, w2, b2):
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, b1)), w2, b2)

The first placeholder is the region's input; the pattern's output is the region's output.
Write the pattern in the IR of the graph it should match (torch functions for FX-traced models,
aten ops for exported ones). Rules refer to it by name; rule files never run code.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

from graftfx.errors import GraftError
from graftfx.match.cost import count_params, graph_flops
from graftfx.match.grid import region_grid
from graftfx.match.paths import block_index, common_path
from graftfx.match.region import Region
from graftfx.match.report import MatchReport
from graftfx.match.walk import params_of, region_nodes
from graftfx.registry import PATTERNS, register_pattern
from graftfx.trace.tracer import TracedGraph, module_path, node_dtype, node_shape

BUILTIN = {"self_attention", "causal_self_attention", "cross_attention", "joint_attention", "mlp"}


def pattern(name: str, kind: str | None = None):
    """Decorator registering ``fn`` as pattern ``name``; regions get kind ``kind or name``."""
    if name in BUILTIN:
        raise GraftError(f"pattern name {name!r} is a built-in pattern; choose another name")

    def wrap(fn: Callable) -> Callable:
        graph = fx.symbolic_trace(fn).graph
        register_pattern(name, _matcher(name, kind or name, graph), (fn.__doc__ or fn.__name__).strip())
        return fn

    return wrap


def unregister(name: str) -> None:
    if name not in BUILTIN:
        PATTERNS.pop(name, None)


def _matcher(name: str, kind: str, pattern_graph: fx.Graph):
    def match(traced: TracedGraph) -> MatchReport:
        matcher = SubgraphMatcher(pattern_graph, match_output=False, match_placeholder=False,
                                  remove_overlapping_matches=True, ignore_literals=False)
        report = MatchReport(name)
        for m in matcher.match(traced.graph):
            if not m.placeholder_nodes or len(m.returning_nodes) != 1:
                continue
            x, out = m.placeholder_nodes[0], m.returning_nodes[0]
            nodes = region_nodes([x], out)
            shape = node_shape(x) or ()
            tokens = shape[1] if len(shape) == 3 else None
            path = common_path([module_path(n) for n in m.nodes_map.values() if n.op != "placeholder" and module_path(n)])
            report.regions.append(Region(
                path=path, kind=kind, pattern=name, input=x, output=out, nodes=nodes,
                width=shape[-1] if shape else 0, out_width=(node_shape(out) or (0,))[-1], tokens=tokens,
                grid=region_grid(traced, x, tokens), block_index=block_index(path),
                weights={k: v.detach() for k, v in params_of(nodes, traced.gm).items()},
                params=count_params(params_of(nodes, traced.gm).values()),
                flops=graph_flops(traced.gm, traced.batch_size, nodes), dtype=node_dtype(x),
                details={"anchor": m.anchors[0].name if m.anchors else ""},
            ))
        return report

    return match
