import torch

import graftfx
from graftfx.distill import Stage2Config, apply_ema, train_stage2


def test_stage2_trains_all_without_touching_teacher_and_resumes(tmp_path, digits_dit, rules, digits):
    before = {k: v.clone() for k, v in digits_dit.state_dict().items()}
    cfg = Stage2Config(steps=6, batch_size=8, ckpt_every=3, log_every=1, num_classes=10, objective="both")
    torch.manual_seed(0)
    a = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    res = train_stage2(a, digits_dit, *digits, cfg, tmp_path / "a", progress=False)
    assert torch.isfinite(torch.tensor(res["loss"]))
    for k, v in digits_dit.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [n for n, p in a.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "stage 2 with train=all left the non-spliced weights alone"
    torch.manual_seed(0)
    b = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    train_stage2(b, digits_dit, *digits, Stage2Config(**{**cfg.__dict__, "steps": 3}), tmp_path / "b", progress=False)
    torch.manual_seed(0)
    c = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    res_c = train_stage2(c, digits_dit, *digits, cfg, tmp_path / "b", resume=True, progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    apply_ema(c, res_c["ema"])
    assert not torch.equal(dict(c.named_parameters())["blocks.1.attn.q.weight"], dict(a.named_parameters())["blocks.1.attn.q.weight"])


def test_stage2_spliced_only_freezes_the_rest(tmp_path, digits_dit, rules, digits):
    g = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    frozen = {n: p.clone() for n, p in g.named_parameters() if not n.startswith(("blocks.1.attn", "blocks.3.attn", "blocks.1.mlp", "blocks.3.mlp"))}
    train_stage2(g, None, *digits, Stage2Config(steps=3, batch_size=4, train="spliced", num_classes=10), tmp_path, progress=False)
    for n, p in g.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_export_round_trip_identical_outputs(tmp_path, digits_dit, rules):
    g = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    with torch.no_grad():
        for p in g.spliced_parameters():
            p.add_(0.01)
    graftfx.export_grafted(g, tmp_path, base_id="tiny", base_hash=graftfx.export.fingerprint(digits_dit),
                           metrics={"fid": None})
    h = graftfx.load_grafted(digits_dit, tmp_path)
    x = digits_dit.example_inputs(3)
    with torch.no_grad():
        assert torch.equal(g(*x), h(*x))
    import json

    manifest = json.loads((tmp_path / "graft.json").read_text())
    assert [r["path"] for r in manifest["regions"]] == ["blocks.1.attn", "blocks.3.attn", "blocks.1.mlp", "blocks.3.mlp"]
    assert manifest["regions"][2]["options"] == {"ratio": 3} and manifest["base"]["id"] == "tiny"


def test_load_grafted_refuses_other_base(tmp_path, digits_dit, rules):
    import pytest

    g = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    graftfx.export_grafted(g, tmp_path, base_hash=graftfx.export.fingerprint(digits_dit))
    other = type(digits_dit)(digits_dit.config)
    with pytest.raises(graftfx.GraftError, match="was grafted onto base model"):
        graftfx.load_grafted(other, tmp_path)
