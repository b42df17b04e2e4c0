"""graftfx pretrain: training reduces the loss, runs are reproducible and resumable bit for bit,
checkpoints are atomic safetensors, NaN stops cleanly, the bundled model loads, the CLI explains itself."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from graftfx.data import DIGITS_CONFIG, digits_split
from graftfx.errors import GraftError
from graftfx.models import (BUNDLED_DIGITS_DIT, DiT, DiTConfig, GaussianDiffusion, bundled_digits_config,
                            load_bundled_digits_dit, load_dit)
from graftfx.pretrain import TrainSettings, train_digits
from graftfx.io import atomic_save_safetensors
from graftfx.pretrain.train import batch_indices, checkpoint_store, eval_loss, resolve_settings

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0,
            num_classes=10, learn_sigma=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the CI machine has two cores for everything)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    (x, y), (xt, yt) = digits_split()
    return (x[:48], y[:48]), (xt[:24], yt[:24])


def settings(**kw):
    base = dict(steps=4, batch=16, lr=2e-3, warmup=2, ckpt_every=2, log_every=1, sample_steps=2, model=TINY)
    return TrainSettings(**{**base, **kw})


def run(out, data, **kw):
    resume = kw.pop("resume", False)
    return train_digits(out, settings(**kw), resume=resume, data=data, progress=False, export=False)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_reduces_loss_on_a_fixed_batch(tmp_path, data):
    (x, y), _ = data
    fixed = ((x[:16], y[:16]), (x[:16], y[:16]))             # train and measure on the same 16 images
    diffusion = GaussianDiffusion(1000, learn_sigma=True)
    before = eval_loss(DiT(DiTConfig(**TINY)), diffusion, x[:16], y[:16], seed=0)
    result = run(tmp_path, fixed, steps=25, lr=3e-3, warmup=0, ckpt_every=25, log_every=5)
    after = eval_loss(result.model, diffusion, x[:16], y[:16], seed=0)
    assert after < 0.5 * before, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 5 and losses[-1] < losses[0]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, data):
    a = run(tmp_path / "a", data, seed=3)
    b = run(tmp_path / "b", data, seed=3)
    c = run(tmp_path / "c", data, seed=4)
    assert same_tensors(a.model.state_dict(), b.model.state_dict())
    assert same_tensors(a.ema.state_dict(), b.ema.state_dict())
    assert not torch.equal(a.model.blocks[0].attn.qkv.weight, c.model.blocks[0].attn.qkv.weight)


def test_resume_continues_bit_for_bit(tmp_path, data):
    whole = run(tmp_path / "whole", data, steps=6, ckpt_every=3)
    run(tmp_path / "split", data, steps=3, ckpt_every=3)
    resumed = run(tmp_path / "split", data, steps=6, ckpt_every=3, resume=True)
    assert resumed.step == 6
    assert same_tensors(whole.model.state_dict(), resumed.model.state_dict())
    assert same_tensors(whole.ema.state_dict(), resumed.ema.state_dict())
    ckpt_a = checkpoint_store(tmp_path / "whole").require()
    ckpt_b = checkpoint_store(tmp_path / "split").require()
    opt_a, opt_b = ckpt_a.state("optimizer"), ckpt_b.state("optimizer")
    assert opt_a["state"].keys() == opt_b["state"].keys() and len(opt_a["state"]) > 10
    assert all(same_tensors(opt_a["state"][i], opt_b["state"][i]) for i in opt_a["state"])
    assert opt_a["param_groups"] == opt_b["param_groups"]

    def losses(folder):
        rows = (json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r.get("loss"), r.get("eval_loss_ema")) for r in rows]
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    assert [r["start_step"] for r in ckpt_b.meta["runs"]] == [0, 3]


def test_batches_are_epoch_permutations():
    rows = torch.cat([batch_indices(10, 4, step, seed=1) for step in range(5)])   # 2 epochs of 10 rows
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert not torch.equal(rows[:10], rows[10:])


def test_checkpoints_are_safetensors_written_atomically(tmp_path, data, monkeypatch):
    run(tmp_path, data, steps=4, ckpt_every=2, keep=1)
    root = tmp_path / "checkpoints"
    assert checkpoint_store(tmp_path).require().step == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-0000004"]     # keep=1 pruned step 2
    folder = root / "step-0000004"
    assert sorted(p.name for p in folder.iterdir()) == ["complete.json", "optimizer.safetensors", "state.json",
                                                        "weights.safetensors"]
    with safe_open(str(folder / "weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert "model.blocks.0.attn.qkv.weight" in keys and "ema.final_layer.linear.weight" in keys
    with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
        assert {k.rsplit(".", 1)[1] for k in f.keys()} == {"exp_avg", "exp_avg_sq", "step"}
    assert json.loads((folder / "state.json").read_text())["step"] == 4

    # A crash at the rename leaves the old file whole and no temp file behind.
    target = tmp_path / "x.safetensors"
    atomic_save_safetensors(target, {"w": torch.ones(3)})

    real_replace = os.replace

    def crash(src, dst):
        raise OSError("disk went away")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_save_safetensors(target, {"w": torch.zeros(3)})
    with safe_open(str(target), framework="pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.ones(3))

    # A crash when the complete step folder is swapped in leaves latest.json on the old checkpoint.
    def crash_on_folders(src, dst):
        if Path(src).is_dir():
            raise OSError("disk went away")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_on_folders)
    with pytest.raises(OSError):
        run(tmp_path, data, steps=6, ckpt_every=2, keep=1, resume=True)
    monkeypatch.undo()
    assert checkpoint_store(tmp_path).require().step == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-0000004"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
    run(tmp_path, data, steps=2, ckpt_every=2)
    (x, y), test = data
    poisoned = ((torch.full_like(x, float("nan")), y), test)
    with pytest.raises(GraftError, match=r"pretrain digits diverged in step 3: loss = nan.*grad_norm = nan; "
                                         r"the last good checkpoint \(step 2\) is kept in .*step-0000002; fix: "):
        run(tmp_path, poisoned, steps=6, ckpt_every=1, resume=True)
    ckpt = checkpoint_store(tmp_path).require()
    assert ckpt.step == 2 and all(torch.isfinite(v).all() for v in ckpt.tensors("weights").values())


def test_resume_guards(tmp_path, data):
    with pytest.raises(GraftError, match=r"--resume: no complete checkpoint in .*checkpoints; fix: run without "
                                         r"--resume to start, or pass the --out of an earlier run"):
        run(tmp_path, data, resume=True)
    with pytest.raises(GraftError, match="no complete checkpoint"):
        resolve_settings(tmp_path, {}, resume=True)
    run(tmp_path, data, steps=2)
    with pytest.raises(GraftError, match="already holds a training run"):
        run(tmp_path, data, steps=4)
    with pytest.raises(GraftError, match="--lr 0.1 differs"):
        resolve_settings(tmp_path, {"lr": 0.1}, resume=True)
    assert resolve_settings(tmp_path, {"steps": 9}, resume=True).batch == 16
    with pytest.raises(GraftError, match="--steps must be an integer >= 1"):
        TrainSettings(steps=0)


def test_export_writes_weights_grid_and_card(tmp_path, data):
    result = train_digits(tmp_path, settings(steps=2), data=data, progress=False, command="graftfx pretrain digits --x")
    assert set(result.files) == {"dit.safetensors", "dit-samples.png", "dit.md"}
    weights = tmp_path / "dit.safetensors"
    model = load_dit(weights, bundled_digits_config(weights))            # strict, config from the metadata
    assert same_tensors(model.state_dict(), result.ema.state_dict())
    assert (tmp_path / "dit-samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (tmp_path / "dit.md").read_text()
    assert "graftfx pretrain digits --x" in card and "DDPM sampler over 2 respaced steps" in card


@pytest.mark.skipif(not BUNDLED_DIGITS_DIT.is_file(), reason="bundled digits DiT not committed yet")
def test_bundled_model_loads_strictly_and_runs():
    model = load_bundled_digits_dit()
    assert model.config == DiTConfig(**DIGITS_CONFIG)
    x, t, y = model.example_inputs(3)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (3, 2, 8, 8) and torch.isfinite(out).all()


def test_cli_help_explains_every_flag(capsys):
    from graftfx.cli import _ARGS, COMMANDS, build_parser, main
    from graftfx.pretrain.cli import register

    register(COMMANDS, _ARGS)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["pretrain"]
    flags = [a for a in sub._actions if a.dest != "help"]
    assert {a.dest for a in flags} >= {"out", "steps", "batch", "lr", "seed", "resume", "threads"}
    assert all(a.help and len(a.help) > 10 for a in flags)
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for a in flags:
        assert (a.option_strings[0] if a.option_strings else "digits") in text


def test_cli_resume_without_checkpoint_exits_2(tmp_path, capsys):
    from graftfx.cli import _ARGS, COMMANDS, main
    from graftfx.pretrain.cli import register

    register(COMMANDS, _ARGS)
    assert main(["pretrain", "digits", "--out", str(tmp_path / "none"), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no complete checkpoint" in err and "fix:" in err
