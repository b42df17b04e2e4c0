"""Generated checkpoints and export folders (tests/reliability/_harness.py): each ends in a load
that matches the source or a one-line GraftError naming the file; no pickle runs, nothing hangs,
no dtype slips through, and load_grafted never changes the caller's base model. A seeded sample
here (GRAFTFX_RELIABILITY=full: 1,000 checkpoints, 500 export folders); then the issue's cases."""
import json
import re
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import graftfx
from graftfx import GraftError

from . import _harness as h


def test_generated_checkpoints_load_exactly_or_fail_in_one_line(tmp_path):
    tally = h.run_checkpoints(tmp_path, h.sample_size(1000, 80), h.SEED)
    assert not tally.bad(), tally.summary()
    assert tally.counts()["success"] >= 5


def test_generated_export_folders_load_exactly_or_fail_in_one_line(tmp_path):
    tally = h.run_manifests(tmp_path, h.sample_size(500, 40), h.SEED)
    assert not tally.bad(), tally.summary()
    assert tally.counts()["success"] >= 2


@pytest.fixture
def ckpt(tmp_path):
    model = h.tiny_dit()
    return model, model.state_dict(), tmp_path


@pytest.mark.parametrize("mutate, message", [
    pytest.param(lambda sd: {k: (v * 10).long() for k, v in sd.items()}, "holds int64 tensors", id="int64"),
    pytest.param(lambda sd: {k: v.double() for k, v in sd.items()}, "holds float64 tensors", id="fp64"),
    pytest.param(lambda sd: {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, "holds float8_e4m3fn tensors",
                 id="fp8"),
    pytest.param(lambda sd: {**sd, "blocks.1000000.x": torch.zeros(1)}, "key blocks.1000000.x has block index 1000000, not a DiT block number",
                 id="block-1000000"),
    pytest.param(lambda sd: {**sd, "pos_embed": torch.zeros(3)}, "pos_embed has shape [3], not the 3-D shape", id="shape"),
    pytest.param(lambda sd: {**sd, "x_embedder.proj.weight": torch.zeros(64, 4, 0, 0)},
                 "x_embedder.proj.weight has shape [64, 4, 0, 0]", id="zero-patch"),
    pytest.param(lambda sd: {**sd, "blocks.0.mlp.fc1.bias": torch.full((256,), float("nan"))},
                 "tensor blocks.0.mlp.fc1.bias holds NaN", id="nan"),
])
def test_the_issues_checkpoints(ckpt, mutate, message):
    _, sd, tmp = ckpt
    path = tmp / "c.safetensors"
    save_file(mutate({k: v.clone() for k, v in sd.items()}), str(path))
    start = time.perf_counter()
    with pytest.raises(GraftError) as e:
        graftfx.models.load_dit(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert time.perf_counter() - start < 10          # blocks.1000000 used to build for minutes


@pytest.mark.parametrize("config, message", [
    pytest.param({"depth": 100000}, "config depth=100000 must be an integer from 1 to 1024", id="depth-100000"),
    pytest.param({"patch_size": 0}, "config patch_size=0 must be an integer from 1", id="patch-0"),
    pytest.param({"depth": "four"}, "config depth='four' must be an integer", id="depth-str"),
    pytest.param({"colour": 1}, "config field 'colour' is not a DiTConfig field", id="unknown"),
    pytest.param({"depth": 3}, "holds 4 blocks but its config says depth=3", id="depth-mismatch"),
])
def test_a_metadata_config_is_checked_before_anything_is_built(ckpt, config, message):
    model, sd, tmp = ckpt
    import dataclasses

    path = tmp / "c.safetensors"
    save_file(sd, str(path), metadata={"config": json.dumps({**dataclasses.asdict(model.config), **config})})
    with pytest.raises(GraftError, match=message.replace("(", r"\(").replace(")", r"\)")):
        graftfx.models.load_dit(path)


def test_pickles_are_refused_in_one_line_and_never_run(ckpt):
    import pickle

    _, sd, tmp = ckpt
    sentinel = tmp / "ran"
    for i, blob in enumerate([pickle.dumps({"model": h.Evil(sentinel)})]):
        path = tmp / f"evil{i}.pt"
        path.write_bytes(blob)
        with pytest.raises(GraftError) as e:
            graftfx.models.load_dit(path)
        assert "graftfx never unpickles" in str(e.value) and "\n" not in str(e.value)
    path = tmp / "evil-zip.pt"
    torch.save({"ema": sd, "x": h.Evil(sentinel)}, path)
    with pytest.raises(GraftError, match="graftfx never unpickles"):
        graftfx.models.load_dit(path)
    (tmp / "empty.pt").write_bytes(b"")
    with pytest.raises(GraftError, match=r"empty.pt is empty \(0 bytes\)"):
        graftfx.models.load_dit(tmp / "empty.pt")
    assert not sentinel.exists()


@pytest.fixture
def shipped(tmp_path):
    import copy

    from graftfx.rules import Rule, Select

    base = h.tiny_dit()
    rules = [Rule("self_attention", "mha", Select(preset="paper-50"), {"init": "fresh"}),
             Rule("mlp", "mlp", Select(preset="paper-50"), {"ratio": 3})]
    g = graftfx.graft(copy.deepcopy(base), rules, base.example_inputs(2))
    with torch.no_grad():                # as after stage 2 with train=all: the unreplaced modules moved too
        for p in g.parameters():
            p.add_(0.01)
    graftfx.export_grafted(g, tmp_path / "x", base_hash=graftfx.export.fingerprint(base))
    return base, g, tmp_path / "x"


def test_load_grafted_never_changes_the_base_and_loads_twice(shipped):
    base, g, folder = shipped
    before = graftfx.export.fingerprint(base)
    x = base.example_inputs(3)
    with torch.no_grad():
        want_base = base(*x)
    a = graftfx.load_grafted(base, folder)
    b = graftfx.load_grafted(base, folder)          # refused before: the first load had changed the base
    assert graftfx.export.fingerprint(base) == before
    with torch.no_grad():
        assert torch.equal(base(*x), want_base)
        assert torch.equal(a(*x), g(*x)) and torch.equal(b(*x), g(*x))
    mine, theirs = a.state_dict(), base.state_dict()
    shared = {t.data_ptr() for t in theirs.values()} & {t.data_ptr() for t in mine.values()}
    assert not shared, "the reloaded model shares tensors with the base"


@pytest.mark.parametrize("edit, message", [
    pytest.param(lambda m: m.update(format=99), "has format 99; this graftfx reads formats 1 and 2", id="format-99"),
    pytest.param(lambda m: m["inputs"]["args"][0].update(tensor=[400000, 1000, 1000, 1]),
                 "example inputs ask for 400,000,000,0", id="400GB-input"),
    pytest.param(lambda m: m.update(base=None), "base must be an object", id="base-null"),
    pytest.param(lambda m: m["regions"][0].update(rule="nobody"), "rule 'nobody' must be one of the manifest's rules",
                 id="unknown-rule"),
    pytest.param(lambda m: m["rules"][0].update(operator="graftfx_evil:Op"), "is an import path; rule files never "
                 "import code", id="import-path"),
    pytest.param(lambda m: m["regions"][2].update(config={"ratio": 10000, "activation": None, "init": "auto"}),
                 "would hold", id="absurd-config"),
])
def test_the_issues_manifests(shipped, monkeypatch, edit, message):
    base, _, folder = shipped
    manifest = json.loads((folder / "graft.json").read_text())
    edit(manifest)
    (folder / "graft.json").write_text(json.dumps(manifest))
    import graftfx.export.export as export

    calls = []
    real = export.fingerprint
    monkeypatch.setattr(export, "fingerprint", lambda m: calls.append(1) or real(m))
    with pytest.raises(GraftError) as e:
        graftfx.load_grafted(base, folder)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    if "format" in message or "ceiling" in message:
        assert not calls, "the cheap checks come before hashing the base model"


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.bool])
def test_manifest_weights_of_another_dtype_are_refused(shipped, dtype):
    base, _, folder = shipped
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: (v * 10).to(dtype) for k, v in state.items()}, str(folder / "model.safetensors"))
    manifest = json.loads((folder / "graft.json").read_text())
    manifest.pop("weights")                          # an export of before the checksum: the dtype check still holds
    (folder / "graft.json").write_text(json.dumps(manifest))
    with pytest.raises(GraftError, match=f"keys of the wrong dtype: .* {str(dtype)[6:]} vs model float32"):
        graftfx.load_grafted(base, folder)


def test_weights_that_do_not_belong_to_the_manifest_are_refused(shipped):
    base, _, folder = shipped
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v + 1 for k, v in state.items()}, str(folder / "model.safetensors"))
    with pytest.raises(GraftError, match="is not the file graft.json was written with"):
        graftfx.load_grafted(base, folder)


def test_export_replaces_the_folder_whole_and_keeps_the_users_files(shipped, monkeypatch):
    base, g, folder = shipped
    (folder / "NOTES.md").write_text("mine")
    old = (folder / "model.safetensors").read_bytes()
    import graftfx.export.export as export

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "atomic_write_json", full)
    with pytest.raises(GraftError, match=r"export to .* failed: no space left on the device; the earlier export there"):
        graftfx.export_grafted(g, folder)
    monkeypatch.undo()
    assert (folder / "model.safetensors").read_bytes() == old and (folder / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["x"]           # no temporary folder left
    graftfx.export_grafted(g, folder)
    assert (folder / "NOTES.md").read_text() == "mine"
    graftfx.load_grafted(base, folder)


def test_data_files_are_checked(tmp_path):
    from graftfx.distill import load_data
    from graftfx.distill.pipeline import check_data

    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    cases = {
        "int": ({"latents": x.long(), "labels": y}, "latents are int64; they must be floating point"),
        "ndim": ({"latents": x.flatten(1), "labels": y}, "latents have shape [5, 64]; they must be (N, C, H, W)"),
        "float-labels": ({"latents": x, "labels": y.float()}, "labels are float32 of shape [5]"),
        "count": ({"latents": x, "labels": y[:2]}, "5 latents but 2 labels"),
        "nan": ({"latents": x * float("nan"), "labels": y}, "latents hold NaN"),
        "keys": ({"images": x}, "lacks tensor(s) latents, labels"),
    }
    for name, (tensors, message) in cases.items():  # noqa: B007
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(GraftError, match=re.escape(message)):
            load_data(str(path))
    model = graftfx.models.load_bundled_digits_dit()
    with pytest.raises(GraftError, match=r"latents are \[3, 8, 8\] per sample but the model takes \[1, 8, 8\]"):
        check_data(torch.randn(4, 3, 8, 8), y[:4], model)
    with pytest.raises(GraftError, match=r"labels range 0..50, but the model has 10 classes"):
        check_data(torch.randn(2, 1, 8, 8), torch.tensor([0, 50]), model)
