import pytest
import torch
import torch.nn as nn

import graftfx
from graftfx import GraftError
from graftfx.models import DiT_models
from graftfx.trace import module_path, node_shape, op_kind


def test_every_node_knows_its_module_path(tiny_dit):
    traced = graftfx.trace(tiny_dit, tiny_dit.example_inputs(2))
    assert traced.tracer == "fx"
    paths = {module_path(n) for n in traced.graph.nodes}
    assert {"blocks.3.attn", "blocks.3.attn.qkv", "blocks.0.mlp.fc2", "final_layer.linear"} <= paths
    sdpa = [n for n in traced.graph.nodes if op_kind(n) == "sdpa"]
    assert [module_path(n) for n in sdpa] == [f"blocks.{i}.attn" for i in range(4)]
    assert node_shape(sdpa[0]) == (2, 4, 16, 16)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_batch_dimension_stays_dynamic(tiny_dit, batch):
    traced = graftfx.trace(tiny_dit, tiny_dit.example_inputs(2))
    x = tiny_dit.example_inputs(batch)
    with torch.no_grad():
        torch.testing.assert_close(traced.gm(*x), tiny_dit(*x), rtol=0, atol=0)


def test_dit_xl2_traces_on_meta_without_materialising():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]().eval()
    traced = graftfx.trace(model, model.example_inputs(2))
    assert all(p.is_meta for p in traced.gm.parameters())
    assert len(graftfx.match(traced, "self_attention").regions) == 28
    assert node_shape(next(n for n in traced.graph.nodes if module_path(n) == "blocks.27.attn.proj")) == (2, 256, 1152)


def test_dit_real_weights_trace_equals_model(dit_s2):
    x = dit_s2.example_inputs(2)
    traced = graftfx.trace(dit_s2, x)
    with torch.no_grad():
        assert torch.equal(traced.gm(*x), dit_s2(*x))


class NeedsExport(nn.Module):
    """int() of a traced shape breaks torch.fx.symbolic_trace; torch.export handles it."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        side = int(x.shape[1] ** 0.5)
        q, k, v = self.qkv(x).reshape(x.shape[0], side * side, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(x.shape[0], side * side, 16))


def test_falls_back_to_export_and_says_why():
    model = NeedsExport().eval()
    traced = graftfx.trace(model, (torch.randn(2, 16, 16),))
    assert traced.tracer == "export"
    assert "symbolic_trace" in traced.notes[0]
    assert len(graftfx.match(traced, "self_attention").regions) == 1
    x = torch.randn(5, 16, 16)
    torch.testing.assert_close(traced.gm(x), model(x))


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither tracer can follow it
            return x * 2
        return x - 1


def test_untraceable_model_error_names_both_failures():
    with pytest.raises(GraftError) as e:
        graftfx.trace(Untraceable(), (torch.randn(2, 3),))
    msg = str(e.value)
    assert "torch.fx.symbolic_trace:" in msg and "torch.export (non-strict):" in msg and "Untraceable" in msg
