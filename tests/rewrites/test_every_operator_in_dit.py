"""Every registered operator, spliced into DiT-S/2 by a rule file, runs forward and backward."""
import pytest
import torch

import graftfx
from graftfx.models import DiT_models
from graftfx.registry import operators

ATTENTION = sorted(n for n, s in operators().items() if "self_attention" in s.kinds)
MLP = sorted(n for n, s in operators().items() if s.kinds == ("mlp",))


def test_all_paper_operators_are_registered():
    assert {"hyena_se", "hyena_x", "hyena_y", "hyena_x2d", "swa", "nat2d", "linear_attention", "mamba2", "mha"} <= set(ATTENTION)
    assert {"mlp", "mlp_hyena_x"} <= set(MLP)


@pytest.fixture(scope="module")
def dit_s2():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"]().eval().requires_grad_(False)  # only spliced weights need gradients
    with torch.no_grad():
        for b in model.blocks:
            b.adaLN_modulation[1].weight.normal_(0, 0.02)
        model.final_layer.linear.weight.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("operator", ATTENTION + MLP)
def test_operator_from_rule_file_runs_forward_and_backward_in_dit_s2(operator, dit_s2, tmp_path):
    pattern = "mlp" if operator in MLP else "self_attention"
    path = tmp_path / "rule.toml"
    path.write_text(f'version = 1\n[[rule]]\npattern = "{pattern}"\noperator = "{operator}"\n'
                    'select = { preset = "paper-50", paths = ["blocks.*"] }\n')
    grafted = graftfx.graft(dit_s2, str(path), dit_s2.example_inputs(2))
    assert [g.target for g in grafted.grafts] == [f"blocks.{i}.{'mlp' if pattern == 'mlp' else 'attn'}" for i in (1, 3, 5, 7, 9, 11)]
    assert all(type(grafted.get_submodule(g.target)).operator_name == operator for g in grafted.grafts)
    x, t, y = dit_s2.example_inputs(1)
    out = grafted(x, t, y)
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in grafted.spliced_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
