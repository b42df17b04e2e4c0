"""Test support only (never shipped in graftfx/): import timm where torchvision cannot load.

``import timm`` imports torchvision at import time: ``torchvision.ops.misc.FrozenBatchNorm2d``
(timm.layers) and the data pipeline's transforms and datasets (timm.data, which timm.models
imports for its mean/std constants). PyPI's torchvision for torch 2.13.0 is a CUDA build that
fails to load against the CPU torch here (``operator torchvision::nms does not exist``), so the
set-up installs timm without its torchvision dependency (Makefile, constraints.txt).

``import_timm()`` uses the real torchvision when it imports. Otherwise, only while timm
imports, a stand-in answers every ``torchvision.*`` import: ``FrozenBatchNorm2d`` is a real
plain-PyTorch module (torchvision's semantics); every other name is an inert placeholder class
(usable as a base class or a dict key at import time, raising if anyone calls it). The stand-in
leaves ``sys.modules`` afterwards, so nothing else (transformers' availability checks) ever sees
a fake torchvision. The zoo builds models only, never timm's data pipeline.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

import torch
import torch.nn as nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (torchvision's semantics)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


def _placeholder(name: str) -> type:
    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {name} is not available (the tests' torchvision "
                           "stand-in only lets timm import; install a torchvision matching torch)")

    return _PlaceholderMeta(name.rsplit(".", 1)[-1], (), {"__init__": refuse, "__qualname__": name})


def _module_attr(prefix: str, name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _placeholder(f"{prefix}.{name}")


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []
        if module.__name__ == "torchvision.ops.misc":
            module.FrozenBatchNorm2d = FrozenBatchNorm2d
        module.__getattr__ = lambda name, prefix=module.__name__: _module_attr(prefix, name)


def _real_torchvision() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # noqa: BLE001 - ImportError, or the CUDA build's RuntimeError
        _forget_torchvision()
        return False


def _forget_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_timm() -> types.ModuleType:
    """The ``timm`` module (the stand-in is in place only while it imports, when needed)."""
    if "timm" in sys.modules or _real_torchvision():
        return importlib.import_module("timm")
    finder = _StandIn()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    finally:
        sys.meta_path.remove(finder)
        _forget_torchvision()
