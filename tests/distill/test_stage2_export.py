import json

import pytest
import torch

import graftfx
from graftfx import GraftError
from graftfx.distill import Stage2Config, apply_ema, train_stage2
from graftfx.training import CheckpointStore

SPLICED = ("blocks.1.attn.", "blocks.3.attn.", "blocks.1.mlp.", "blocks.3.mlp.")  # paper-50 on a 4-block DiT


def test_stage2_trains_all_without_touching_teacher_and_resumes(tmp_path, digits_dit, rules, digits):
    before = {k: v.clone() for k, v in digits_dit.state_dict().items()}
    cfg = Stage2Config(steps=6, batch_size=8, ckpt_every=3, log_every=1, num_classes=10, objective="both")
    torch.manual_seed(0)
    a = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    init = {n: p.detach().clone() for n, p in a.named_parameters()}
    res = train_stage2(a, digits_dit, *digits, cfg, tmp_path / "a", progress=False)
    assert torch.isfinite(torch.tensor(res["loss"]))
    assert res["checkpoint"] == str(tmp_path / "a" / "checkpoint" / "step-0000006")
    for k, v in digits_dit.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher weight {k} changed"
    unchanged = [n for n, p in a.named_parameters() if torch.equal(p, init[n])]
    assert not unchanged, f"train=all left these parameters as they were: {unchanged}"
    torch.manual_seed(0)
    b = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    train_stage2(b, digits_dit, *digits, Stage2Config(**{**cfg.__dict__, "steps": 3}), tmp_path / "b", progress=False)
    torch.manual_seed(0)
    c = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    res_c = train_stage2(c, digits_dit, *digits, cfg, tmp_path / "b", resume=True, progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    assert res_c["ema"].keys() == res["ema"].keys()
    assert all(torch.equal(res["ema"][k], res_c["ema"][k]) for k in res["ema"])
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    apply_ema(c, res_c["ema"])
    name = "blocks.1.attn.qkv.weight"
    assert torch.equal(dict(c.named_parameters())[name], res_c["ema"][name])
    assert not torch.equal(dict(c.named_parameters())[name], dict(a.named_parameters())[name])


def _live_output(model):
    """DiT's adaLN-Zero init zeroes the final layer, so no gradient reaches the blocks until it has
    trained; with train="spliced" it never does. A non-zero final layer lets the blocks learn."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        w = model.final_layer.linear.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return model


def test_stage2_spliced_only_trains_them_and_leaves_the_rest_bit_identical(tmp_path, digits_dit, rules, digits):
    _live_output(digits_dit)
    g = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    spliced = {n for n, _ in g.spliced_named_parameters()}
    assert spliced and all(n.startswith(SPLICED) for n in spliced)
    state = {k: v.clone() for k, v in g.state_dict().items()}         # parameters and buffers
    assert state.keys() - spliced, "nothing outside the spliced operators to check"
    res = train_stage2(g, None, *digits, Stage2Config(steps=3, batch_size=4, train="spliced", num_classes=10),
                       tmp_path, progress=False)
    assert set(res["ema"]) == spliced
    for k, v in g.state_dict().items():
        if k in spliced:
            assert not torch.equal(v, state[k]), f"spliced parameter {k} did not train"
        else:
            assert torch.equal(v, state[k]), f"{k} is not spliced but changed"


def test_stage2_resume_needs_a_resumable_checkpoint(tmp_path, digits_dit, rules, digits):
    cfg = Stage2Config(steps=2, batch_size=4, num_classes=10)
    g = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    with pytest.raises(GraftError, match=r"--resume: no complete checkpoint in .*checkpoint; fix: run without "
                                         r"--resume to start, or pass the --out of an earlier run"):
        train_stage2(g, digits_dit, *digits, cfg, tmp_path, resume=True, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()
    # what an FSDP run of an older graftfx wrote: the weights, no optimizer state
    CheckpointStore(tmp_path / "checkpoint").save(2, tensors={"model": g.state_dict(), "ema": {}},
                                                  meta={"resumable": False})
    with pytest.raises(GraftError, match=r"did not save its optimizer state; fix: rerun without --resume"):
        train_stage2(g, digits_dit, *digits, cfg, tmp_path, resume=True, progress=False)


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
    manifest = json.loads((tmp_path / "graft.json").read_text())
    assert [r["path"] for r in manifest["regions"]] == ["blocks.1.attn", "blocks.3.attn", "blocks.1.mlp", "blocks.3.mlp"]
    assert manifest["regions"][2]["config"]["ratio"] == 3 and manifest["base"]["id"] == "tiny"


def test_load_grafted_refuses_other_base(tmp_path, digits_dit, rules):
    g = graftfx.graft(digits_dit, rules, digits_dit.example_inputs(2))
    graftfx.export_grafted(g, tmp_path, base_hash=graftfx.export.fingerprint(digits_dit))
    other = type(digits_dit)(digits_dit.config)
    with pytest.raises(graftfx.GraftError, match="was grafted onto base model"):
        graftfx.load_grafted(other, tmp_path)


def test_export_cli_takes_a_runs_checkpoint_folder(tmp_path, capsys):
    """`graftfx export --weights RUN/stage1/checkpoint --partial` ships the trained operators."""
    from graftfx.cli import main
    from graftfx.distill import DistillSettings, Stage1Config, load_data, run_distill
    from graftfx.export import load_grafted
    from graftfx.models import load_bundled_digits_dit

    teacher = load_bundled_digits_dit()
    rules = "digits-mha-hyena_x-50p.toml"
    settings = DistillSettings(stage="1", online=True, samples=8, export=False,
                               stage1=Stage1Config(steps=3, batch_size=4, lr=1e-2))
    x, y = load_data("digits")
    result = run_distill(teacher, teacher.example_inputs(2), rules, x[:32], y[:32], tmp_path / "run", settings,
                         progress=False, log=lambda *a: None)
    folder = tmp_path / "run" / "stage1" / "checkpoint"
    assert main(["export", rules, "--model", "digits", "--weights", str(folder), "--partial",
                 "--out", str(tmp_path / "shipped")]) == 0
    shipped = load_grafted(load_bundled_digits_dit(), tmp_path / "shipped")
    inputs = teacher.example_inputs(3)
    with torch.no_grad():
        assert torch.equal(shipped(*inputs), result.grafted(*inputs))   # the trained weights made it
    # without --partial the spliced-only checkpoint is refused, naming what it lacks
    assert main(["export", rules, "--model", "digits", "--weights", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "missing keys: " in capsys.readouterr().err
