"""graftfx.training.checkpoint: a step folder counts only once complete; resume reads the newest
complete one (never a temporary or damaged folder); pruning keeps ``keep``; no checkpoint on
resume is a one-line GraftError naming the folder and the fix."""
import errno
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from graftfx.errors import GraftError
from graftfx.training import CheckpointStore, checkpoint, flatten, lr_lambda, unflatten
from graftfx.training import checkpoint as ckpt_module


def _save(store, step, value=None):
    value = float(step) if value is None else value
    return store.save(step, tensors={"params": {"a.weight": torch.full((3, 2), value), "b": torch.arange(4)}},
                      states={"train": {"opt": {0: {"step": torch.tensor(value)}}, "betas": (0.9, 0.99)}},
                      meta={"note": f"step {step}"})


def test_a_complete_folder_is_found_with_everything_in_it(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    state = {"state": {0: {"exp_avg": torch.randn(5), "step": torch.tensor(3.0)}, 7: {}},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "amsgrad": False, "params": [0, 7]}],
             "gen": torch.Generator().manual_seed(5).get_state(), "weird.key": {"x": 1}, "weird": {"key": torch.ones(1)}}
    params = {"blocks.0.w": torch.randn(4, 4), "blocks.0.b": torch.zeros(4, dtype=torch.bfloat16)}
    folder = store.save(10, tensors={"params": params}, states={"train": state}, meta={"config": {"lr": 1e-3}})
    assert folder == tmp_path / "ck" / "step-0000010"
    assert sorted(p.name for p in folder.iterdir()) == ["complete.json", "params.safetensors", "state.json",
                                                        "train.safetensors"]
    assert json.loads((tmp_path / "ck" / "latest.json").read_text()) == {"step": 10, "folder": "step-0000010"}
    ck = store.latest()
    assert ck.step == 10 and ck.folder == folder and ck.meta == {"config": {"lr": 1e-3}, "step": 10}
    got = ck.tensors("params")
    assert got.keys() == params.keys() and all(torch.equal(got[k], params[k]) and got[k].dtype == params[k].dtype
                                               for k in params)
    with safe_open(str(folder / "params.safetensors"), framework="pt") as f:  # plain safetensors for other tools
        assert set(f.keys()) == set(params)
    back = ck.state("train")
    assert back["param_groups"] == state["param_groups"] and isinstance(back["param_groups"][0]["betas"], tuple)
    assert set(back["state"]) == {0, 7} and torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert torch.equal(back["gen"], state["gen"]) and back["weird.key"] == {"x": 1}
    assert torch.equal(back["weird"]["key"], torch.ones(1))
    assert checkpoint.checkpoint_file(tmp_path / "ck") == folder / "params.safetensors"


def test_optimizer_and_scheduler_state_round_trips_bit_for_bit():
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, 6))

    def train(model, opt, sched, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            loss = model(torch.randn(8, 4, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    whole = setup()
    train(*whole, 3, 1)
    train(*whole, 3, 2)
    part = setup()
    train(*part, 3, 1)
    tensors, skeleton = flatten({"opt": part[1].state_dict(), "sched": part[2].state_dict(),
                                 "model": part[0].state_dict()})
    saved = unflatten({k: v.clone() for k, v in tensors.items()}, skeleton)
    resumed = setup()
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["sched"])
    train(*resumed, 3, 2)
    for a, b in zip(whole[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    assert resumed[2].get_last_lr() == whole[2].get_last_lr()


def test_unstorable_state_is_refused_by_path():
    with pytest.raises(TypeError, match=r"object at opt\.fn cannot be stored"):
        flatten({"opt": {"fn": object()}})


@pytest.mark.parametrize("damage", ["file missing", "record missing", "file truncated", "record garbled",
                                    "record of another step"])
def test_an_incomplete_folder_is_never_read_the_previous_one_is(tmp_path, damage):
    store = CheckpointStore(tmp_path, keep=3)
    _save(store, 2)
    newest = _save(store, 4)
    if damage == "file missing":
        (newest / "train.safetensors").unlink()
    elif damage == "record missing":
        (newest / "complete.json").unlink()
    elif damage == "file truncated":
        data = (newest / "params.safetensors").read_bytes()
        (newest / "params.safetensors").write_bytes(data[:-8])
    elif damage == "record garbled":
        (newest / "complete.json").write_text("{\"format\": ")
    else:
        record = json.loads((newest / "complete.json").read_text())
        (newest / "complete.json").write_text(json.dumps({**record, "step": 6}))
    # latest.json still names step 4: it is not trusted
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 4
    ck = store.require()
    assert ck.step == 2 and torch.equal(ck.tensors("params")["a.weight"], torch.full((3, 2), 2.0))
    assert store.steps() == [2]


def test_the_temp_folder_a_crashed_writer_left_is_never_read_and_is_cleaned_up(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 2)
    complete = _save(store, 4)
    # a writer killed just before its rename: a whole folder (record and all), under its temporary name
    shutil.copytree(complete, tmp_path / ".step-0000006.4242-deadbeef.tmp")
    (tmp_path / "latest.json").unlink()             # a pointer lost too: scanning finds the newest complete
    assert store.require().step == 4
    _save(store, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-0000004", "step-0000008"]


def test_a_crash_or_full_disk_mid_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    _save(store, 2)
    real = ckpt_module._write_safetensors
    calls = []

    def full_disk(path, tensors, metadata):
        calls.append(path.name)
        if len(calls) == 2:  # the second file of the folder
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt_module, "_write_safetensors", full_disk)
    with pytest.raises(GraftError) as e:
        _save(store, 4, value=99.0)
    assert str(e.value) == (f"checkpoint step 4 could not be written to {tmp_path}: no space left on the device; "
                            f"the last good checkpoint (step 2) is kept in {tmp_path / 'step-0000002'}; fix: free "
                            "space (or use another --out) and rerun with --resume")
    monkeypatch.undo()
    assert calls == ["params.safetensors", "train.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-0000002"]   # no temp left behind
    ck = store.require()
    assert ck.step == 2 and torch.equal(ck.tensors("params")["a.weight"], torch.full((3, 2), 2.0))
    assert ck.state("train")["opt"][0]["step"].item() == 2.0          # weights and optimizer from the same step


def test_a_crash_between_the_rename_and_the_pointer_resumes_from_the_new_folder(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    _save(store, 2)
    real = ckpt_module.atomic_write_json

    def crash_on_pointer(path, obj, *a, **k):
        if path.name == "latest.json":
            raise KeyboardInterrupt("killed")
        return real(path, obj, *a, **k)

    monkeypatch.setattr(ckpt_module, "atomic_write_json", crash_on_pointer)
    with pytest.raises(KeyboardInterrupt):
        _save(store, 4)
    monkeypatch.undo()
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    assert store.require().step == 4                 # complete, renamed into place: it counts
    _save(store, 6)
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 6


def test_pruning_keeps_keep_complete_checkpoints(tmp_path):
    for keep in (1, 2, 3):
        store = CheckpointStore(tmp_path / str(keep), keep=keep)
        for step in range(1, 6):
            _save(store, step)
        assert store.steps() == list(range(6 - keep, 6))
        names = sorted(p.name for p in store.root.iterdir())
        assert names == ["latest.json"] + [f"step-{s:07d}" for s in range(6 - keep, 6)]
    with pytest.raises(GraftError, match="keep must be >= 1"):
        CheckpointStore(tmp_path, keep=0)


def test_pruning_does_not_count_damaged_folders(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    _save(store, 1)
    _save(store, 2)
    (tmp_path / "step-0000002" / "complete.json").unlink()
    _save(store, 3)
    assert store.steps() == [1, 3] and not (tmp_path / "step-0000002").exists()


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 4, value=1.0)
    _save(store, 4, value=7.0)
    assert torch.equal(store.require().tensors("params")["a.weight"], torch.full((3, 2), 7.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-0000004"]


def test_tensors_that_share_memory_are_stored(tmp_path):
    base = torch.arange(12.0)
    store = CheckpointStore(tmp_path)
    store.save(1, tensors={"p": {"x": base[:6], "y": base[6:], "z": base}})
    got = store.require().tensors("p")
    assert torch.equal(got["x"], base[:6]) and torch.equal(got["y"], base[6:]) and torch.equal(got["z"], base)


def test_no_checkpoint_on_resume_is_a_one_line_error_naming_the_folder_and_the_fix(tmp_path):
    for root in (tmp_path / "never-made", tmp_path):
        with pytest.raises(GraftError) as e:
            CheckpointStore(root).require()
        msg = str(e.value)
        assert "\n" not in msg and msg == (f"--resume: no complete checkpoint in {root}; fix: run without --resume "
                                           "to start, or pass the --out of an earlier run")
    (tmp_path / "step-0000003").mkdir()
    with pytest.raises(GraftError, match=r"\(1 incomplete step folder\(s\) skipped: step-0000003\)"):
        CheckpointStore(tmp_path).require()
    with pytest.raises(GraftError, match="neither a file nor a folder holding a complete checkpoint"):
        checkpoint.checkpoint_file(tmp_path)


def test_clear_removes_checkpoints_only(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    (tmp_path / ".step-0000002.1-x.tmp").mkdir()
    (tmp_path / "rank0").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    store.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "rank0"] and store.latest() is None


def test_the_pause_hook_only_fires_when_asked(tmp_path, monkeypatch):
    marker = tmp_path / "paused"
    monkeypatch.setenv(ckpt_module.PAUSE_ENV, f"5:files:{marker}")
    monkeypatch.setattr(ckpt_module.time, "sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt()))
    store = CheckpointStore(tmp_path / "ck")
    _save(store, 4)
    assert not marker.exists()
    with pytest.raises(KeyboardInterrupt):
        _save(store, 5)
    assert marker.read_text().strip() == str(os.getpid())
    tmp = [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".step-0000005")]
    assert tmp == []  # the writer cleans up after an exception (a SIGKILL cannot: see test_sigkill)
