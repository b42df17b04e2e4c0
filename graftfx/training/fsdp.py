"""FSDP2 for a traced model: one ``fully_shard`` unit per block, mixed precision, and the
per-rank (sharded) state a run needs to resume without a shared filesystem.

``shard(split, precision)`` shards each block unit of a ``BlockSplit`` and then its root (what
no block owns: embeddings, final layer). With ``precision="bf16"`` the units gather bf16
parameters for forward and backward and reduce gradients in fp32; the optimizer keeps fp32
shards (master weights). ``local`` / ``load_local`` read and write a rank's own shards;
``local_optimizer_state`` / ``load_local_optimizer_state`` do the same for AdamW's moments.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from graftfx.errors import GraftError

from .blockwise import BlockSplit

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


def shard(split: BlockSplit, precision: str = "bf16") -> None:
    """``fully_shard`` every unit of ``split``, then its root, on the default process group."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision not in PRECISIONS:
        raise GraftError(f"FSDP precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for unit in split.units.values():
        fully_shard(unit, mp_policy=policy)
    fully_shard(split.module, mp_policy=policy)


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (collective: every rank calls it); else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, as a plain contiguous tensor; else ``t``."""
    return (t.to_local() if is_sharded(t) else t).detach().contiguous()


def load_local(t: torch.Tensor, value: torch.Tensor, name: str) -> None:
    """Copy ``value`` (a shard saved by ``local``) into ``t``'s shard, checking its shape."""
    mine = t.to_local() if is_sharded(t) else t
    if tuple(mine.shape) != tuple(value.shape):
        raise GraftError(f"{name}: the checkpoint's shard has shape {tuple(value.shape)}, this rank's is "
                         f"{tuple(mine.shape)}; fix: resume with the number of ranks the run was started with")
    with torch.no_grad():
        mine.copy_(value)


def local_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with every sharded state tensor replaced by this rank's shard."""
    state = opt.state_dict()
    state["state"] = {k: {n: local(v) if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                      for k, s in state["state"].items()}
    return state


def load_local_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a ``local_optimizer_state``: each moment shard becomes a DTensor laid out like its
    parameter again (the step counters stay plain tensors)."""
    from torch.distributed.tensor import DTensor

    opt.load_state_dict(state)
    for p, s in opt.state.items():
        if not is_sharded(p):
            continue
        for n, v in list(s.items()):
            if isinstance(v, torch.Tensor) and not is_sharded(v) and v.dim() > 0:
                s[n] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride())


def unshard_into(model: nn.Module, split: BlockSplit) -> None:
    """Give ``model`` (the traced model ``split`` was cut from) plain parameters again, with the
    trained values (collective: every rank calls it)."""
    for name, p in list(split.module.named_parameters()):
        value = full(p.detach()).clone()
        module_name, _, leaf = split.names[name].rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        setattr(owner, leaf, nn.Parameter(value, requires_grad=p.requires_grad))
