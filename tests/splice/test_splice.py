import pytest
import torch

import graftfx
from graftfx import GraftError, Rule, Select


def _all_blocks(depth_glob="blocks.*"):
    return [Rule("self_attention", "mha"), Rule("mlp", "mlp", Select(paths=[depth_glob]))]


def test_identity_self_graft_every_region_of_dit_s2(dit_s2):
    """Self-grafting every attention and MLP region with copied weights changes nothing."""
    grafted = graftfx.graft(dit_s2, _all_blocks(), dit_s2.example_inputs(2))
    assert len(grafted.grafts) == 24
    for batch in (1, 2, 5):
        x = dit_s2.example_inputs(batch)
        with torch.no_grad():
            assert (grafted(*x) - dit_s2(*x)).abs().max().item() < 1e-5


def test_one_call_module_per_region_and_untouched_weights_shared(tiny_dit):
    grafted = graftfx.graft(tiny_dit, [Rule("self_attention", "mha", Select(preset="paper-50"), {"init": "fresh"})],
                            tiny_dit.example_inputs(2))
    nodes = {n.target: n for n in grafted.graph.nodes if n.op == "call_module"}
    assert [g.target for g in grafted.grafts] == ["blocks.1.attn", "blocks.3.attn"]
    assert "blocks.1.attn" in nodes and "blocks.1.attn.qkv" not in nodes and "blocks.0.attn.qkv" in nodes
    assert not any(n.op == "call_function" and "scaled_dot_product" in str(n.target) and
                   n.meta.get("graftfx_path", "").startswith("blocks.1.") for n in grafted.graph.nodes)
    # everything else: the very same tensors as the original model
    assert grafted.get_submodule("blocks.0.attn.qkv").weight is tiny_dit.blocks[0].attn.qkv.weight
    assert grafted.get_submodule("blocks.1.mlp.fc1").weight is tiny_dit.blocks[1].mlp.fc1.weight
    spliced = {id(p) for p in grafted.spliced_parameters()}
    original = {id(p) for p in tiny_dit.parameters()}
    assert spliced and not spliced & original
    assert len(spliced) == 2 * 4  # packed qkv and proj: weight + bias, two regions
    assert [n for n, _ in grafted.spliced_named_parameters()][0] == "blocks.1.attn.qkv.weight"


def test_state_roundtrip_through_safetensors(tiny_dit, tmp_path):
    rules = [Rule("mlp", "mlp", Select(paths=["blocks.*"]), {"ratio": 3})]
    a = graftfx.graft(tiny_dit, rules, tiny_dit.example_inputs(2))
    a.save_state(tmp_path / "g.safetensors")
    b = graftfx.graft(tiny_dit, rules, tiny_dit.example_inputs(2))  # fresh init differs
    x = tiny_dit.example_inputs(2)
    with torch.no_grad():
        assert not torch.equal(a(*x), b(*x))
        b.load_state(tmp_path / "g.safetensors")
        assert torch.equal(a(*x), b(*x))
    assert not (tmp_path / "g.safetensors.tmp").exists()


def test_state_load_refuses_other_graft(tiny_dit, tmp_path):
    a = graftfx.graft(tiny_dit, [Rule("mlp", "mlp", Select(indices=[0]), {"ratio": 3})], tiny_dit.example_inputs(2))
    a.save_state(tmp_path / "g.safetensors")
    b = graftfx.graft(tiny_dit, [Rule("self_attention", "mha", Select(indices=[0]))], tiny_dit.example_inputs(2))
    with pytest.raises(GraftError, match="does not fit"):
        b.load_state(tmp_path / "g.safetensors")


def test_rule_matching_nothing_lists_model_contents(tiny_dit):
    with pytest.raises(GraftError) as e:
        graftfx.graft(tiny_dit, [Rule("cross_attention", "mha")], tiny_dit.example_inputs(2))
    assert "matched nothing in DiT; the model contains: self_attention x4, mlp x4" in str(e.value)  # t_embedder: (B, D), not a token MLP


def test_grafted_model_runs_under_torch_compile(tiny_dit):
    grafted = graftfx.graft(tiny_dit, _all_blocks(), tiny_dit.example_inputs(2))
    compiled = torch.compile(grafted, fullgraph=True)
    x = tiny_dit.example_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*x), tiny_dit(*x), atol=1e-5, rtol=1e-5)


def test_graph_lints_and_original_trace_untouched(tiny_dit):
    traced = graftfx.trace(tiny_dit, tiny_dit.example_inputs(2))
    code = traced.gm.code
    grafted = graftfx.splice(graftfx.select(traced, _all_blocks()))
    grafted.graph.lint()
    assert traced.gm.code == code and grafted.code != code
