"""One vocabulary for the ops of both tracers.

``torch.fx.symbolic_trace`` gives ``call_module`` leaves (nn.Linear), torch functions and
tensor methods; ``torch.export`` gives aten overloads with parameters as ``get_attr`` nodes.
``op_kind`` maps a node of either graph to a plain name ("linear", "sdpa", "softmax", ...),
so patterns are written once.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten

# Ops that only move or view data: a path made of these is an index permutation.
SHAPE_OPS = {
    "view", "reshape", "permute", "transpose", "contiguous", "getitem", "unbind", "chunk",
    "split", "unflatten", "flatten", "squeeze", "unsqueeze", "expand", "clone", "to", "type_as",
    "select", "slice", "dropout", "identity", "alias",
}

_MODULE_KINDS = [
    (nn.Linear, "linear"), (nn.LayerNorm, "layer_norm"), (nn.GroupNorm, "group_norm"),
    (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.ReLU, "relu"), (nn.Softmax, "softmax"),
    (nn.Dropout, "dropout"), (nn.Identity, "identity"), (nn.Conv2d, "conv2d"), (nn.Conv1d, "conv1d"),
    (nn.Embedding, "embedding"), (nn.Mish, "mish"), (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"),
]
if hasattr(nn, "RMSNorm"):
    _MODULE_KINDS.append((nn.RMSNorm, "rms_norm"))

_FUNCTION_KINDS = {
    F.linear: "linear", F.scaled_dot_product_attention: "sdpa", F.softmax: "softmax",
    torch.softmax: "softmax", F.gelu: "gelu", F.silu: "silu", F.relu: "relu", torch.relu: "relu",
    F.layer_norm: "layer_norm", torch.matmul: "matmul", operator.matmul: "matmul",
    torch.bmm: "matmul", torch.baddbmm: "baddbmm", torch.einsum: "einsum", F.dropout: "dropout",
    operator.getitem: "getitem", operator.mul: "mul", torch.mul: "mul", operator.truediv: "div",
    torch.div: "div", operator.add: "add", torch.add: "add", torch.cat: "cat", torch.concat: "cat",
    torch.stack: "stack", torch.unbind: "unbind", torch.chunk: "chunk", torch.split: "split",
    torch.permute: "permute", torch.transpose: "transpose", torch.reshape: "reshape",
    torch.flatten: "flatten", torch.tanh: "tanh", torch.sigmoid: "sigmoid", F.mish: "mish",
}
if hasattr(F, "rms_norm"):
    _FUNCTION_KINDS[F.rms_norm] = "rms_norm"

_METHOD_KINDS = {
    "view": "view", "reshape": "reshape", "permute": "permute", "transpose": "transpose",
    "contiguous": "contiguous", "unbind": "unbind", "chunk": "chunk", "split": "split",
    "unflatten": "unflatten", "flatten": "flatten", "squeeze": "squeeze", "unsqueeze": "unsqueeze",
    "expand": "expand", "clone": "clone", "to": "to", "type_as": "type_as", "softmax": "softmax",
    "matmul": "matmul", "mul": "mul", "div": "div", "add": "add", "size": "size",
    "float": "to", "half": "to", "bfloat16": "to", "relu": "relu", "sigmoid": "sigmoid",
    "tanh": "tanh", "mT": "transpose",
}

_ATEN_KINDS = {
    "linear": "linear", "addmm": "addmm", "mm": "matmul", "matmul": "matmul", "bmm": "matmul",
    "baddbmm": "baddbmm", "scaled_dot_product_attention": "sdpa",
    "_scaled_dot_product_flash_attention_for_cpu": "sdpa_tuple",
    "_scaled_dot_product_efficient_attention": "sdpa_tuple",
    "_scaled_dot_product_flash_attention": "sdpa_tuple",
    "_scaled_dot_product_cudnn_attention": "sdpa_tuple",
    "softmax": "softmax", "_softmax": "softmax", "_safe_softmax": "softmax", "gelu": "gelu",
    "silu": "silu", "relu": "relu", "layer_norm": "layer_norm", "native_layer_norm": "layer_norm",
    "rms_norm": "rms_norm", "group_norm": "group_norm", "view": "view", "_unsafe_view": "view",
    "reshape": "reshape", "permute": "permute", "transpose": "transpose", "t": "transpose",
    "contiguous": "contiguous", "clone": "clone", "unbind": "unbind", "chunk": "chunk",
    "split": "split", "split_with_sizes": "split", "select": "select", "slice": "slice",
    "squeeze": "squeeze", "unsqueeze": "unsqueeze", "expand": "expand", "flatten": "flatten",
    "unflatten": "unflatten", "_to_copy": "to", "to": "to", "alias": "alias", "dropout": "dropout",
    "mul": "mul", "div": "div", "add": "add", "cat": "cat", "stack": "stack", "conv2d": "conv2d",
    "conv1d": "conv1d", "embedding": "embedding", "sym_size": "size", "tanh": "tanh",
    "sigmoid": "sigmoid", "einsum": "einsum", "mish": "mish", "detach": "alias",
    "lift_fresh_copy": "alias",
}


def op_kind(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """A plain name for what ``node`` computes, the same for FX and export graphs."""
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        for cls, kind in _MODULE_KINDS:
            if isinstance(mod, cls):
                if kind == "gelu" and getattr(mod, "approximate", "none") == "tanh":
                    return "gelu_tanh"
                return kind
        return "module"
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, node.target)
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            kind = _ATEN_KINDS.get(target._schema.name.split("::")[-1], target._schema.name)
            if kind == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
                return "gelu_tanh"
            return kind
        kind = _FUNCTION_KINDS.get(target)
        if kind == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
            return "gelu_tanh"
        if kind is not None:
            return kind
        return getattr(target, "__name__", str(target))
    return node.op  # placeholder, get_attr, output


def is_shape_op(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    return op_kind(node, gm) in SHAPE_OPS


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's direct fx.Node inputs, positional first, flattening lists."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


def linear_params(node: fx.Node, gm: fx.GraphModule) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """(module path, weight, bias) of a linear node from either tracer."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return node.target, mod.weight, mod.bias
    kind = op_kind(node, gm)
    if kind == "addmm":  # addmm(bias, x, weight.t())
        bias_n, _, wt = node.args[:3]
        w_node = wt.args[0] if isinstance(wt, fx.Node) and wt.op == "call_function" else wt
        weight = _fetch(w_node, gm)
        return _param_owner(w_node), weight, _fetch(bias_n, gm)
    w_node = node.args[1]
    b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return _param_owner(w_node), _fetch(w_node, gm), _fetch(b_node, gm) if b_node is not None else None


def linear_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    if op_kind(node, gm) == "addmm":
        return node.args[1]
    return node.args[0]


def fetch_attr(module: nn.Module, target: str):
    """The attribute a dotted ``target`` names under ``module`` (a get_attr node's value)."""
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def attr_value(n, gm: fx.GraphModule):
    """The tensor a get_attr node holds, or None when ``n`` is not a get_attr node."""
    if isinstance(n, fx.Node) and n.op == "get_attr":
        return fetch_attr(gm, n.target)
    return None


def _fetch(n, gm: fx.GraphModule):
    if n is None:
        return None
    if isinstance(n, fx.Node) and n.op == "get_attr":
        return fetch_attr(gm, n.target)
    raise TypeError(f"node {getattr(n, 'name', n)!r} is not a parameter (get_attr) node")


def _param_owner(n) -> str:
    if isinstance(n, fx.Node) and n.op == "get_attr":
        return n.target.rsplit(".", 1)[0]
    return getattr(n, "name", str(n))
