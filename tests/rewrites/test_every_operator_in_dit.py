"""Every registered operator, spliced into a (tiny) DiT by a rule file: forward and backward,
with values. The grafted model computes exactly what the original does with the operators put
in its blocks by hand (so nothing outside the grafted blocks changed, and every other weight is
the original's very tensor); the first graft sees exactly the original's input there; the
output differs from the original where the operator is new and equals it for copies that are
the original (mha, mlp, nat2d with a kernel covering the grid, swa with a window covering the
sequence); the original model is left untouched."""
import copy
import json

import pytest
import torch

import graftfx
from graftfx.registry import operators

MLP = sorted(n for n, s in operators().items() if s.kinds == ("mlp",))
ATTENTION = sorted(n for n, s in operators().items() if "self_attention" in s.kinds)
# (operator, options, is the original): the tiny DiT has 16 tokens on a 4 x 4 grid.
SAME = {("mha", ()), ("mlp", ()), ("nat2d", ()), ("swa", (("window", 15),))}
CASES = [(n, ()) for n in ATTENTION + MLP] + [("swa", (("window", 15),)), ("nat2d", (("kernel_size", 3),))]


def _rule_file(tmp_path, pattern, operator, options):
    table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options)
    path = tmp_path / "rule.toml"
    path.write_text(f'version = 1\n[[rule]]\npattern = "{pattern}"\noperator = "{operator}"\n'
                    f'options = {{ {table} }}\nselect = {{ preset = "paper-50", paths = ["blocks.*"] }}\n')
    return path


@pytest.mark.parametrize("operator,options", CASES,
                         ids=[n + "".join(f"-{k}{v}" for k, v in o) for n, o in CASES])
def test_operator_from_rule_file_in_dit(operator, options, tiny_dit, tmp_path):
    model = tiny_dit.requires_grad_(False)                 # only the spliced weights train
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slot = "mlp" if operator in MLP else "attn"
    path = _rule_file(tmp_path, "mlp" if slot == "mlp" else "self_attention", operator, options)
    x, t, y = model.example_inputs(2)
    grafted = graftfx.graft(model, str(path), (x, t, y))

    targets = [f"blocks.{i}.{slot}" for i in (1, 3)]       # paper-50 on 4 blocks
    assert [g.target for g in grafted.grafts] == targets
    ops = {target: grafted.get_submodule(target) for target in targets}
    assert all(type(op).operator_name == operator for op in ops.values())
    assert all(g.config[k] == v for g in grafted.grafts for k, v in options)

    # Outside the grafts every parameter is the original's very tensor, and none is lost.
    outside = {n: p for n, p in grafted.named_parameters() if not n.startswith(tuple(t + "." for t in targets))}
    original = {n: p for n, p in model.named_parameters() if not n.startswith(tuple(t + "." for t in targets))}
    assert set(outside) == set(original) and all(outside[n] is original[n] for n in outside)

    # The original with the operators put in its blocks by hand computes the same, both ways.
    by_hand = copy.deepcopy(model)
    for target, op in ops.items():
        setattr(by_hand.get_submodule(target.rsplit(".", 1)[0]), slot, op)
    seen = {}
    ops[targets[0]].register_forward_pre_hook(lambda m, args: seen.setdefault("graft", args[0]))
    model.get_submodule(targets[0]).register_forward_pre_hook(lambda m, args: seen.setdefault("orig", args[0]))
    out = grafted(x, t, y)
    params = list(grafted.spliced_parameters())
    cot = torch.randn_like(out)
    got = torch.autograd.grad(out, params, cot)
    want_out = by_hand(x, t, y)
    want = torch.autograd.grad(want_out, params, cot)
    assert out.shape == (2, 8, 8, 8)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    names = [n for n, _ in grafted.spliced_named_parameters()]
    for name, g, w in zip(names, got, want):
        assert w.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"d{name}: {m}")

    # The first graft sees exactly the original's input there; the output changes only where
    # the operator is new.
    with torch.no_grad():
        reference = model(x, t, y)
    torch.testing.assert_close(seen["graft"], seen["orig"], rtol=0, atol=0)
    if (operator, options) in SAME:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    else:
        assert (out - reference).abs().max() > 1e-3

    # The original model is untouched.
    assert type(model.get_submodule(targets[0])).__name__ in ("Attention", "Mlp")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
