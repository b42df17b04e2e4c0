from .ops import is_shape_op, linear_params, op_kind
from .tracer import DTYPE, PATH, SHAPE, TracedGraph, module_path, node_shape, trace

__all__ = ["trace", "TracedGraph", "module_path", "node_shape", "op_kind", "is_shape_op",
           "linear_params", "PATH", "SHAPE", "DTYPE"]
