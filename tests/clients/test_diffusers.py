"""Real clients: diffusers' DiT and PixArt transformers (small random configs), via torch.export."""
import pytest
import torch

import graftfx
from graftfx import Rule, Select
from graftfx.models.zoo import diffusers_inputs, small_diffusers

pytest.importorskip("diffusers")


def _randomise(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("kind, self_n, cross_n", [("dit", 4, 0), ("pixart", 4, 4)])
def test_regions_found_and_self_graft_identity(kind, self_n, cross_n):
    model = _randomise(small_diffusers(kind))
    traced = graftfx.trace(model, (), diffusers_inputs(model, 2))
    assert traced.tracer == "export"
    selfs = graftfx.match(traced, "self_attention").regions
    cross = graftfx.match(traced, "cross_attention").regions
    assert [r.path for r in selfs] == [f"transformer_blocks.{i}.attn1" for i in range(self_n)]
    assert [r.path for r in cross] == [f"transformer_blocks.{i}.attn2" for i in range(cross_n)]
    assert all(r.heads == 2 and r.width == 32 and r.tokens == 16 for r in selfs)
    rules = [Rule("self_attention", "mha"), Rule("mlp", "mlp", Select(preset="all"))]
    if cross_n:
        rules.append(Rule("cross_attention", "mha"))
    grafted = graftfx.splice(graftfx.select(traced, rules))
    assert len(grafted.grafts) == self_n + cross_n + 4
    assert {g.target for g in grafted.grafts} >= {"transformer_blocks.0.attn1", "transformer_blocks.0.ff.net"}
    for batch in (1, 3):
        kw = diffusers_inputs(model, batch)
        with torch.no_grad():
            assert (grafted(**kw)[0] - model(**kw)[0]).abs().max() < 1e-5


def test_pixart_cross_attention_never_reported_as_self():
    model = small_diffusers("pixart")
    traced = graftfx.trace(model, (), diffusers_inputs(model, 2))
    report = graftfx.match(traced, "self_attention")
    assert not any(r.path.endswith("attn2") for r in report.regions)
    assert any(c.path.endswith("attn2") and "different inputs" in c.reason for c in report.near_misses)
