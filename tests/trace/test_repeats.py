"""The repeats shortcut (graftfx.trace.repeats): export two blocks per stack, copy the rest.

Every check compares against the full export (``repeats=False``) or the model itself.
"""
import pytest
import torch
import torch.nn as nn

import graftfx
from graftfx.models.adapters import adapter_for
from graftfx.models.zoo import small_diffusers, small_diffusers_inputs
from graftfx.trace import PATH, SHAPE
from graftfx.trace.repeats import block_signature, find_stacks

RULES = "pixart-sigma-mha-hyena_x-50p.toml"


def _traces(kind):
    torch.manual_seed(0)
    model = small_diffusers(kind)
    args, kw = adapter_for(model).example(model, 2, text_length=5)
    return model, graftfx.trace(model, args, kw), graftfx.trace(model, args, kw, repeats=False)


@pytest.fixture(scope="module")
def pixart():
    return _traces("pixart")


@pytest.fixture(scope="module")
def dit():
    return _traces("dit")


def _inputs(model, batch):
    return adapter_for(model).example(model, batch, text_length=5)[1]


def _nodes(traced):
    return [(n.op, str(n.target), n.meta.get(PATH), n.meta.get(SHAPE)) for n in traced.graph.nodes]


@pytest.mark.parametrize("which", ["pixart", "dit"])
def test_stitched_graph_is_the_full_export(which, request):
    model, stitched, full = request.getfixturevalue(which)
    assert stitched.notes == [f"exported 2 of {len(model.transformer_blocks)} transformer_blocks; repeated the rest"]
    assert not any("exported" in n for n in full.notes)
    assert _nodes(stitched) == _nodes(full)           # ops, targets, module paths and shapes, in order
    assert stitched.gm.graph._codegen.pytree_info.in_spec == full.gm.graph._codegen.pytree_info.in_spec
    sdpa = [n.meta[PATH] for n in stitched.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert sdpa[-1].startswith("transformer_blocks.3.attn")


@pytest.mark.parametrize("which", ["pixart", "dit"])
@pytest.mark.parametrize("batch", [2, 3])
def test_stitched_outputs_equal_the_model(which, batch, request):
    model, stitched, _ = request.getfixturevalue(which)
    kw = _inputs(model, batch)
    with torch.no_grad():
        assert torch.equal(stitched.gm(**kw)[0], model(**kw)[0])


@pytest.mark.parametrize("which", ["pixart", "dit"])
def test_parameters_are_the_models_own(which, request):
    model, stitched, _ = request.getfixturevalue(which)
    for name, p in model.named_parameters():
        assert stitched.gm.get_parameter(name) is p, name
    for name, b in model.named_buffers():
        assert stitched.gm.get_buffer(name).data_ptr() == b.data_ptr(), name
    assert len(list(stitched.gm.parameters())) == len(list(model.parameters()))


def test_rules_select_and_splice_the_same_regions(pixart):
    model, stitched, full = pixart
    rules = graftfx.load_rules(RULES)
    plans = [graftfx.select(t, rules) for t in (stitched, full)]
    paths = [[(r.name, g.path) for r, g in p.selected] for p in plans]
    assert paths[0] == paths[1] and len(paths[0]) == 2
    grafted = []
    for p in plans:
        torch.manual_seed(0)
        grafted.append(graftfx.splice(p))
    where = [[(g.region.path, g.target) for g in m.grafts] for m in grafted]
    assert where[0] == where[1]
    kw = _inputs(model, 3)
    with torch.no_grad():
        assert torch.equal(grafted[0](**kw)[0], grafted[1](**kw)[0])


def test_two_stacks_in_one_model():
    import diffusers

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=3, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    assert [s.name for s in find_stacks(model)] == ["transformer_blocks", "single_transformer_blocks"]
    traced = graftfx.trace(model, (), small_diffusers_inputs("flux", 2))
    assert traced.notes == ["exported 2 of 3 transformer_blocks; 2 of 3 single_transformer_blocks; repeated the rest"]
    kw = small_diffusers_inputs("flux", 3)
    with torch.no_grad():
        assert torch.equal(traced.gm(**kw)[0], model(**kw)[0])
    paths = {n.meta[PATH] for n in traced.graph.nodes}
    assert {"transformer_blocks.2.attn", "single_transformer_blocks.2.attn"} <= paths


# -- loops the shortcut must not take ------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x, scale):
        return x + self.fc(self.norm(x)) * scale


class Net(nn.Module):
    """A stack of four blocks; ``loop`` picks how forward runs them."""

    def __init__(self, loop="uniform", widths=(16, 16, 16, 16)):
        super().__init__()
        self.loop = loop
        self.inp = nn.Linear(16, widths[0])
        self.blocks = nn.ModuleList(Block(w) for w in widths)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        h = self.inp(x)                                             # (B, 16)
        skips = []
        for i, block in enumerate(self.blocks):
            if self.loop == "long-skip" and i >= len(self.blocks) // 2:
                h = h + skips.pop()
            if self.loop == "index" and i == 3:
                h = h * 2
            h = block(h, self.scale)
            skips.append(h)
        if self.loop == "last":
            h = h + self.blocks[-1].fc.bias
        if self.loop == "count":
            h = h * len(self.blocks)
        return h


def test_a_plain_module_stack_is_stitched():
    model = Net().eval()
    traced = graftfx.trace(model, (torch.randn(2, 16),), tracer="export")
    full = graftfx.trace(model, (torch.randn(2, 16),), tracer="export", repeats=False)
    assert traced.notes == ["exported 2 of 4 blocks; repeated the rest"]
    assert _nodes(traced) == _nodes(full)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(traced.gm(x), model(x))


@pytest.mark.parametrize("loop, why", [
    ("long-skip", "input 0 of blocks.2 is neither an output of blocks.1"),
    ("index", "input 0 of blocks.3 is neither an output of blocks.2"),
    ("last", "the forward asks blocks[-1]"),
    ("count", "the forward asks len(blocks)"),
])
def test_a_loop_that_is_not_uniform_is_exported_whole(loop, why):
    model = Net(loop).eval()
    traced = graftfx.trace(model, (torch.randn(2, 16),), tracer="export")
    assert len(traced.notes) == 1 and traced.notes[0].startswith("exported every block") and why in traced.notes[0]
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(traced.gm(x), model(x))


def test_blocks_that_differ_are_no_stack():
    assert not find_stacks(Net(widths=(16, 16, 16, 8)))
    a, b = Block(), Block()
    b.fc.extra = 3                                  # a plain attribute the forward might read
    assert block_signature(a) != block_signature(b)
    hooked = Net()
    hooked.blocks[2].register_forward_hook(lambda mod, inp, out: out * 2)
    assert not find_stacks(hooked) and [s.name for s in find_stacks(Net())] == ["blocks"]
    model = Net().eval()
    traced = graftfx.trace(model, (torch.randn(2, 16),), tracer="export", repeats=False)
    assert traced.notes == []


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x + self.fc(x)


class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(Counting() for _ in range(4))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_blocks_that_update_their_buffers_update_their_own():
    model = Stateful()
    traced = graftfx.trace(model, (torch.randn(2, 8),), tracer="export")
    assert traced.notes == ["exported 2 of 4 blocks; repeated the rest"]
    for block in model.blocks:
        block.calls.zero_()
    x = torch.randn(3, 8)
    out = traced.gm(x)
    assert [b.calls.item() for b in model.blocks] == [1, 1, 1, 1]
    assert torch.equal(out, model(x))
