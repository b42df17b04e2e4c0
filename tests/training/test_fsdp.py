"""FSDP2 on a block split (one gloo process, world 1): bf16 mixed precision really computes in
bf16 and keeps fp32 master weights; fp32 stays fp32; a rank's shards of the parameters and of
AdamW's moments survive a save/load round trip as DTensors laid out like their parameters."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import graftfx
from graftfx.errors import GraftError
from graftfx.training.blockwise import split_blocks
from graftfx.training.fsdp import (is_sharded, load_local, load_local_optimizer_state, local, local_optimizer_state,
                                   shard, unshard_into)

from .._distill_job import tiny_digits_dit, tiny_rules


@pytest.fixture(scope="module", autouse=True)
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _grafted():
    m = tiny_digits_dit()
    return graftfx.splice(graftfx.select(graftfx.trace(m, m.example_inputs(2)), tiny_rules())), m.example_inputs(2)


@pytest.mark.parametrize("precision, compute", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_of_compute_and_of_master_weights(precision, compute):
    g, x = _grafted()
    split = split_blocks(g, activation_checkpointing=True)
    shard(split, precision)
    seen = set()
    for module in split.module.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda m, a: seen.add((m.weight.dtype, a[0].dtype)))
    y = split.module(*x)
    y.float().square().sum().backward()
    assert seen == {(compute, compute)}
    for name, p in split.module.named_parameters():
        assert is_sharded(p) and p.dtype == torch.float32, name      # master weights: fp32 shards
        assert p.grad is not None and p.grad.dtype == torch.float32, name


def test_shards_and_adam_moments_round_trip():
    g, x = _grafted()
    split = split_blocks(g)
    shard(split, "fp32")
    params = list(split.module.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    split.module(*x).square().sum().backward()
    opt.step()
    saved = {n: local(p).clone() for n, p in split.module.named_parameters()}
    state = local_optimizer_state(opt)
    moments = [(s["exp_avg"].to_local().clone(), s["exp_avg_sq"].to_local().clone()) for s in opt.state.values()]
    assert all(not is_sharded(v) for s in state["state"].values() for v in s.values())
    # a fresh optimizer and changed weights, then the saved state back
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    fresh = torch.optim.AdamW(params, lr=1e-2)
    load_local_optimizer_state(fresh, state)
    for n, p in split.module.named_parameters():
        load_local(p, saved[n], n)
        assert torch.equal(local(p), saved[n]), n
    for (avg, sq), (p, s) in zip(moments, fresh.state.items()):
        assert is_sharded(s["exp_avg"]) and s["exp_avg"].placements == p.placements
        assert torch.equal(s["exp_avg"].to_local(), avg) and torch.equal(s["exp_avg_sq"].to_local(), sq)
    fresh.step()   # the moments work as DTensors again
    with pytest.raises(GraftError, match=r"shard has shape \(3,\), this rank's is .*; fix: resume with the number "):
        load_local(params[0], torch.zeros(3), "w")


def test_unshard_into_gives_plain_trained_parameters():
    g, x = _grafted()
    split = split_blocks(g)
    shard(split, "fp32")
    with torch.no_grad():
        for p in split.module.parameters():
            p.mul_(2.0)
    want = {split.names[n]: p.full_tensor() for n, p in split.module.named_parameters()}
    unshard_into(g, split)
    for n, p in g.named_parameters():
        assert not is_sharded(p) and torch.equal(p, want[n]), n
