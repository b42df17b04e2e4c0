"""Nested training state (optimizer, scheduler, RNG) as flat tensors plus a JSON skeleton, so it
can live in a safetensors file and load back without unpickling anything.

    tensors, skeleton = flatten(opt.state_dict())     # {"state.0.exp_avg": tensor, ...}, JSON text
    opt.load_state_dict(unflatten(tensors, skeleton))

The skeleton keeps what JSON would lose: int dict keys (optimizer state is keyed by parameter
index), tuples (AdamW betas) versus lists, and which leaves are tensors. Every container is a
one-key object: ``{"dict": [[key, value], ...]}``, ``{"list": [...]}``, ``{"tuple": [...]}``,
``{"tensor": name}``; scalars (str, int, float, bool, None) stand as themselves.
"""
from __future__ import annotations

import json
from typing import Any

import torch


def flatten(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """``obj``'s tensors by dotted path, and the JSON skeleton that rebuilds ``obj`` around them."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(x, path: str):
        if isinstance(x, torch.Tensor):
            key = path or "tensor"
            if key in tensors:  # dotted keys can collide ({"a.b": t, "a": {"b": u}})
                n = 1
                while f"{key}#{n}" in tensors:
                    n += 1
                key = f"{key}#{n}"
            tensors[key] = x
            return {"tensor": key}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, dict):
            items = []
            for k, v in x.items():
                if not isinstance(k, (str, int)):
                    raise TypeError(f"checkpoint state: key {k!r} at {path or '<root>'} is a {type(k).__name__}; "
                                    "only str and int keys can be stored")
                items.append([k, encode(v, f"{path}.{k}" if path else str(k))])
            return {"dict": items}
        if isinstance(x, (list, tuple)):
            kind = "tuple" if isinstance(x, tuple) else "list"
            return {kind: [encode(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x)]}
        raise TypeError(f"checkpoint state: {type(x).__name__} at {path or '<root>'} cannot be stored "
                        "(tensors, dicts, lists, tuples, str, int, float, bool and None can)")

    skeleton = encode(obj, "")
    return tensors, json.dumps(skeleton, separators=(",", ":"))


def unflatten(tensors: dict[str, torch.Tensor], skeleton: str) -> Any:
    """The object ``flatten`` took apart."""
    def decode(x):
        if not isinstance(x, dict):
            return x
        (kind, value), = x.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "dict":
            return {k: decode(v) for k, v in value}
        if kind == "list":
            return [decode(v) for v in value]
        if kind == "tuple":
            return tuple(decode(v) for v in value)
        raise ValueError(f"checkpoint state: unknown skeleton node {kind!r}")

    return decode(json.loads(skeleton))
