"""``split_blocks``: a traced model cut into one unit per block computes exactly what it did,
forward and every gradient, on an FX graph (graftfx's DiT) and an exported one (diffusers
PixArt), at another batch size; its units own the model's own parameters; activation
checkpointing really recomputes each block in backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graftfx
from graftfx.errors import GraftError
from graftfx.training.blockwise import Checkpointed, split_blocks

from .._distill_job import tiny_digits_dit, tiny_rules


@pytest.fixture(scope="module")
def dit():
    m = tiny_digits_dit()
    g = graftfx.splice(graftfx.select(graftfx.trace(m, m.example_inputs(2)), tiny_rules()))
    return g, (lambda b: m.example_inputs(b)), [f"blocks.{i}" for i in range(4)]


@pytest.fixture(scope="module")
def pixart():
    from graftfx.models.adapters import adapter_for
    from graftfx.models.zoo import small_diffusers

    m = small_diffusers("pixart")
    a, kw = adapter_for(m).example(m, 2)
    g = graftfx.splice(graftfx.select(graftfx.trace(m, a, kw), graftfx.load_rules("pixart-sigma-mha-hyena_x-50p.toml")))
    blocks = [f"transformer_blocks.{i}" for i in range(len(m.transformer_blocks))]
    return g, (lambda b: adapter_for(m).example(m, b)), blocks


def _inputs(make, batch):
    made = make(batch)
    return made if isinstance(made[-1], dict) else (made, {})


def _output(y):
    return y[0] if isinstance(y, tuple) else y


def _forward_backward(module, args, kwargs):
    module.zero_grad(set_to_none=True)
    y = _output(module(*args, **kwargs))
    (y.square().sum() + y.sum()).backward()
    return y.detach()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "recompute"])
@pytest.mark.parametrize("case", ["dit", "pixart"])
def test_split_equals_the_traced_model(case, checkpointing, request):
    g, make, blocks = request.getfixturevalue(case)
    split = split_blocks(g, activation_checkpointing=checkpointing)
    assert list(split.blocks.values()) == blocks
    assert all(isinstance(u, Checkpointed) == checkpointing for u in split.units.values())
    split.module.graph.lint()
    own = dict(g.named_parameters())
    assert set(split.names.values()) == set(own)
    for name, p in split.module.named_parameters():
        assert p is own[split.names[name]], name        # the model's own tensors, not copies
    for batch in (2, 3):
        args, kwargs = _inputs(make, batch)
        want = _forward_backward(g, args, kwargs)
        grads = {n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}
        got = _forward_backward(split.module, args, kwargs)
        assert torch.equal(want, got)
        seen = {split.names[n]: p.grad for n, p in split.module.named_parameters() if p.grad is not None}
        assert seen.keys() == grads.keys() and len(grads) > 10
        for n in grads:
            assert torch.equal(grads[n], seen[n]), n


def test_each_block_owns_its_parameters_and_the_rest_stays_outside(dit):
    g, _, _ = dit
    split = split_blocks(g)
    for unit, block in split.blocks.items():
        names = [split.names[f"{unit}.{n}"] for n, _ in split.units[unit].named_parameters()]
        assert names and all(n.startswith(block + ".") for n in names), (block, names)
    outside = [v for k, v in split.names.items() if not k.startswith("unit")]
    assert outside and not any(n.startswith("blocks.") for n in outside)   # embeddings, final layer


def _count_calls(split, checkpointing, calls):
    """Count every run of each block's forward (module hooks do not fire on recomputation)."""
    for unit in split.units.values():
        block = unit.block if checkpointing else unit
        block.forward = (lambda *a, f=block.forward: (calls.append(1), f(*a))[1])


def test_checkpointing_recomputes_every_block_in_backward(dit):
    g, make, _ = dit
    for checkpointing, want in ((False, 4), (True, 8)):   # 4 blocks; recomputed once each in backward
        calls = []
        split = split_blocks(g, activation_checkpointing=checkpointing)
        _count_calls(split, checkpointing, calls)
        _forward_backward(split.module, make(2), {})
        assert len(calls) == want, checkpointing
    calls = []
    split = split_blocks(g, activation_checkpointing=True)
    _count_calls(split, True, calls)
    with torch.no_grad():   # nothing to recompute without autograd
        split.module(*make(2))
    assert len(calls) == 4


def test_a_module_tied_between_blocks_is_a_clear_error():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.lin(torch.tanh(self.out(x)))   # block 1's call of the tied Linear sits inside it

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.blocks[1].lin = self.blocks[0].lin          # one Linear in both blocks

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    g = graftfx.trace(Tied(), (torch.randn(2, 4),)).gm
    with pytest.raises(GraftError, match=r"^module blocks\.0\.lin is called from 2 places .*; fix: use --parallel ddp"):
        split_blocks(g)
