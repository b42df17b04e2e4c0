import pytest
import torch

import graftfx
from graftfx import Rule
from graftfx.match import CROSS_ATTENTION, JOINT_ATTENTION, SELF_ATTENTION

from .zoo import GEGLU, Cross, ExplicitSoftmax, InterleavedQKV, Joint, Net, QKNorm, SwiGLU, inputs

SELF_STYLES = [pytest.param(c, id=c.__name__) for c in (ExplicitSoftmax, InterleavedQKV, QKNorm)]


@pytest.mark.parametrize("style", SELF_STYLES)
def test_self_attention_styles_match_and_self_graft_exactly(style):
    model = Net(style).eval()
    traced = graftfx.trace(model, inputs(2))
    report = graftfx.match(traced, "self_attention")
    assert [r.path for r in report.regions] == ["blocks.0.attn", "blocks.1.attn"]
    r = report.regions[0]
    assert (r.kind, r.width, r.heads, r.head_dim, r.tokens) == (SELF_ATTENTION, 32, 4, 8, 16)
    assert r.params == sum(p.numel() for p in model.blocks[0].attn.parameters())
    grafted = graftfx.splice(graftfx.select(traced, [Rule("self_attention", "mha")]))
    for batch in (1, 3):
        x = inputs(batch)
        with torch.no_grad():
            assert (grafted(*x) - model(*x)).abs().max() < 1e-5


def test_match_changes_nothing(tiny_dit):
    traced = graftfx.trace(tiny_dit, tiny_dit.example_inputs(2))
    before = traced.gm.code
    graftfx.match(traced, "self_attention")
    graftfx.match(traced, "mlp")
    graftfx.select(traced, [Rule("self_attention", "mha")])
    assert traced.gm.code == before


def test_cross_attention_is_never_self_attention():
    model = Net(Cross).eval()
    traced = graftfx.trace(model, inputs(2))
    assert graftfx.match(traced, "self_attention").regions == []
    misses = [str(c) for c in graftfx.match(traced, "self_attention").near_misses]
    assert misses[0] == "blocks.0.attn: softmax/attention found, but q and k come from different inputs (cross-attention)"
    cross = graftfx.match(traced, "cross_attention").regions
    assert [(r.path, r.kind, r.details["context_width"]) for r in cross] == [("blocks.0.attn", CROSS_ATTENTION, 24),
                                                                            ("blocks.1.attn", CROSS_ATTENTION, 24)]
    grafted = graftfx.splice(graftfx.select(traced, [Rule("cross_attention", "mha")]))
    x = inputs(3)
    with torch.no_grad():
        assert (grafted(*x) - model(*x)).abs().max() < 1e-5


def test_joint_attention_is_its_own_kind_and_refused_for_self_rules():
    model = Net(Joint).eval()
    traced = graftfx.trace(model, inputs(2))
    assert graftfx.match(traced, "self_attention").regions == []
    near = graftfx.match(traced, "self_attention").near_misses
    assert any("joint attention" in c.reason for c in near)
    from graftfx.rewrites.patterns.attention import analyse

    assert {r.kind for r in analyse(traced)[0]} == {JOINT_ATTENTION}
    with pytest.raises(graftfx.GraftError, match="matched nothing"):
        graftfx.select(traced, [Rule("self_attention", "mha")])


def test_self_attention_operator_refused_on_cross_region():
    from dataclasses import dataclass

    from graftfx.operator import Operator
    from graftfx.registry import OPERATORS, register_operator

    @dataclass
    class NoOptions:
        pass

    @register_operator("test_self_only", config=NoOptions, kinds=("self_attention",))
    class SelfOnly(Operator):
        """A self-attention-only operator."""

        @classmethod
        def from_region(cls, region, config):
            op = cls()
            op.config = config
            return op

        def flops(self, tokens):
            return 0

    try:
        traced = graftfx.trace(Net(Cross).eval(), inputs(2))
        with pytest.raises(graftfx.GraftError, match="replaces self_attention regions, but blocks.0.attn is cross_attention"):
            graftfx.select(traced, [Rule("cross_attention", "test_self_only")])
    finally:
        OPERATORS.pop("test_self_only")


@pytest.mark.parametrize("mlp", [pytest.param(GEGLU, id="GEGLU"), pytest.param(SwiGLU, id="SwiGLU")])
def test_gated_mlps_match_and_self_graft_exactly(mlp):
    model = Net(InterleavedQKV, mlp).eval()
    traced = graftfx.trace(model, inputs(2))
    regions = graftfx.match(traced, "mlp").regions
    assert [r.path for r in regions] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert regions[0].details["gated"] and regions[0].hidden == (96 if mlp is GEGLU else 48)
    assert regions[0].details["fused_gate"] == (mlp is GEGLU)
    grafted = graftfx.splice(graftfx.select(traced, [Rule("mlp", "mlp")]))
    x = inputs(2)
    with torch.no_grad():
        assert (grafted(*x) - model(*x)).abs().max() < 1e-5


def test_region_record_fields(dit_s2):
    traced = graftfx.trace(dit_s2, dit_s2.example_inputs(2))
    attn = graftfx.match(traced, "self_attention").regions[3]
    assert (attn.path, attn.block_index, attn.grid, attn.width, attn.heads, attn.tokens) == ("blocks.3.attn", 3, (16, 16), 384, 6, 256)
    w = dit_s2.blocks[3].attn.qkv.weight
    assert torch.equal(attn.weights["v.weight"], w[768:]) and torch.equal(attn.weights["out.weight"], dit_s2.blocks[3].attn.proj.weight)
    # FLOPs per sample: 4 projections of 2*L*D*D plus QK^T and PV at 2*L*L*D each
    assert attn.flops == 4 * 2 * 256 * 384 * 384 + 4 * 256 * 256 * 384
    mlp = graftfx.match(traced, "mlp").regions[0]      # the (B, D) t_embedder MLP is no token MLP
    assert (mlp.path, mlp.hidden, mlp.activation, mlp.flops) == ("blocks.0.mlp", 1536, "gelu_tanh", 2 * 2 * 256 * 384 * 1536)
    assert attn.input.name.startswith("add") and attn.output.target == "blocks.3.attn.proj"
