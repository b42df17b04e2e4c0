"""Evaluation: Frechet math, the committed digit classifier, Digits-FID, evaluate(), real-FID
error paths and plumbing, sample grids, the `graftfx eval` subcommands."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from graftfx.data import digits_split
from graftfx.errors import GraftError
from graftfx.eval import (EvalRecord, class_accuracy, digits_fid, evaluate, frechet_distance, gaussian_stats,
                          inception_fid, load_classifier, sample_per_class, save_comparison, save_grid)
from graftfx.eval import inception as inc
from graftfx.eval.classifier import DEFAULT_WEIGHTS
from graftfx.eval.frechet import stats_distance


@pytest.fixture(scope="module")
def split():
    return digits_split()


def _random_cov(d, seed):
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    return a @ a.T / d + 0.1 * np.eye(d)


# ---- Frechet distance ---------------------------------------------------------------------------

def test_frechet_of_identical_sets_is_zero():
    x = torch.randn(300, 16, dtype=torch.float64)
    s = gaussian_stats(x)
    assert stats_distance(s, s) < 1e-9


def test_frechet_of_shifted_and_scaled_gaussians_matches_closed_form():
    d = 12
    sigma = _random_cov(d, 0)
    x = np.random.default_rng(0).multivariate_normal(np.zeros(d), sigma, size=400)
    x = x - x.mean(0)                                    # zero sample mean, so 2x has the same mean
    shift = np.linspace(-1, 1, d)
    a, b = gaussian_stats(x), gaussian_stats(x + shift)   # same covariance: distance = |shift|^2
    assert stats_distance(a, b) == pytest.approx(float(shift @ shift), rel=1e-9)
    c = gaussian_stats(2 * x)                            # S and 4S: tr S + 4 tr S - 2 * 2 tr S = tr S
    assert stats_distance(a, c) == pytest.approx(float(np.trace(a.sigma)), rel=1e-9)


def test_frechet_matches_scipy_sqrtm_on_non_commuting_covariances():
    from scipy import linalg

    d = 10
    s1, s2 = _random_cov(d, 1), _random_cov(d, 2)
    mu1, mu2 = np.zeros(d), np.full(d, 0.3)
    root = linalg.sqrtm(s1 @ s2).real
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_is_finite_for_singular_covariances():
    x = torch.randn(5, 32, dtype=torch.float64)          # 5 samples in 32 dims: rank 4
    value = stats_distance(gaussian_stats(x), gaussian_stats(x + 0.5))
    assert np.isfinite(value) and value == pytest.approx(32 * 0.25, rel=1e-6)


def test_frechet_rejects_mismatched_stats():
    with pytest.raises(GraftError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---- committed classifier, accuracy, Digits-FID ------------------------------------------------

def test_committed_classifier_loads_and_matches_its_card(split):
    from safetensors import safe_open

    _, (x_test, y_test) = split
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    model = load_classifier()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).double().mean())
    assert acc > 0.95
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        recorded = float(f.metadata()["test_accuracy"])
    assert acc == pytest.approx(recorded, abs=1e-6)      # the card's number is this file's
    card = (DEFAULT_WEIGHTS.parent / "classifier.md").read_text()
    assert f"**{recorded:.4f}**" in card and "graftfx eval train-classifier" in card


def test_classifier_load_errors(tmp_path):
    with pytest.raises(GraftError, match="not found: train one"):
        load_classifier(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(GraftError, match="not a graftfx digit classifier"):
        load_classifier(tmp_path / "other.safetensors")


def test_class_accuracy_on_real_labelled_digits(split):
    _, (x_test, y_test) = split
    assert class_accuracy(x_test, y_test) > 0.95
    wrong = (y_test + 1) % 10
    assert class_accuracy(x_test, wrong) < 0.1


def test_digits_fid_orders_real_noisy_and_noise(split):
    (x_train, _), (x_test, _) = split
    g = torch.Generator().manual_seed(0)
    real = digits_fid(x_test, x_train)
    noisy = digits_fid((x_test + 0.5 * torch.randn(x_test.shape, generator=g)).clamp(-1, 1), x_train)
    noise = digits_fid(torch.rand(x_test.shape, generator=g) * 2 - 1, x_train)
    assert real < noisy < noise
    assert noise > 10 * real
    assert digits_fid(x_test, "test") < 1e-6                        # a set against itself
    assert digits_fid(x_test) == pytest.approx(digits_fid(x_test, "full"))  # default reference


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4, 3, 8, 8), "need \\(N, 1, 8, 8\\)"),
    (torch.full((4, 1, 8, 8), float("nan")), "NaN or inf"),
])
def test_digits_fid_rejects_bad_samples(bad, message):
    with pytest.raises(GraftError, match=message):
        digits_fid(bad)


def test_digits_fid_rejects_unknown_reference(split):
    with pytest.raises(GraftError, match="unknown digits reference 'val'"):
        digits_fid(split[1][0], "val")


# ---- evaluate() ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_digits_dit():
    from graftfx.models import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=1, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                          num_classes=10))
    with torch.no_grad():  # leave adaLN-Zero so the outputs depend on the label
        for p in model.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return model.eval()


def test_evaluate_samples_a_dit_and_records_the_settings(tiny_digits_dit):
    record = evaluate(tiny_digits_dit, n_per_class=2, steps=3, cfg_scale=2.0, sampler="ddim", seed=5,
                      progress=False)
    assert isinstance(record, EvalRecord)
    assert (record.n, record.n_per_class, record.steps, record.cfg_scale, record.sampler, record.seed) == \
        (20, 2, 3, 2.0, "ddim", 5)
    assert record.fid > 0 and 0.0 <= record.accuracy <= 1.0 and len(record.per_class_accuracy) == 10
    assert record.metric == "digits-fid" and record.reference == "full"
    assert "ddim sampler, 3 steps, cfg 2, seed 5" in record.summary()


def test_sample_per_class_is_reproducible_and_batch_independent(tiny_digits_dit):
    kw = dict(steps=3, cfg_scale=1.0, sampler="ddim", seed=1, progress=False)
    a, labels = sample_per_class(tiny_digits_dit, 2, batch_size=20, **kw)
    b, _ = sample_per_class(tiny_digits_dit, 2, batch_size=7, **kw)
    assert labels.tolist() == list(range(10)) * 2
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c, _ = sample_per_class(tiny_digits_dit, 2, batch_size=20, **{**kw, "seed": 2})
    assert not torch.allclose(a, c)


def test_evaluate_given_samples_records_settings_as_given(split, tmp_path):
    _, (x_test, y_test) = split
    record = evaluate(x_test, y_test, reference="train")
    assert record.steps is None and record.sampler is None and record.n == len(x_test)
    assert record.accuracy > 0.95 and record.reference == "train"
    assert "sampler settings not recorded" in record.summary()
    saved = json.loads(record.write_json(tmp_path / "r.json").read_text())
    assert saved["fid"] == pytest.approx(record.fid) and saved["n"] == len(x_test)


# ---- real FID -----------------------------------------------------------------------------------

def test_real_fid_names_every_missing_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(inc, "installed_backends", lambda: [])
    with pytest.raises(GraftError) as e:
        inception_fid(torch.zeros(2, 3, 8, 8), tmp_path / "ref.npz", tmp_path / "inception.pth")
    msg = str(e.value)
    assert "\n" not in msg
    assert "neither torch-fidelity nor pytorch-fid is installed" in msg and "pip install" in msg
    assert f"Inception weights {tmp_path / 'inception.pth'} not found" in msg
    assert f"reference statistics {tmp_path / 'ref.npz'} not found" in msg


def test_real_fid_named_backend_and_no_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(inc, "installed_backends", lambda: [])
    with pytest.raises(GraftError, match="pytorch-fid is not installed.*no Inception weights given.*"
                                         "no reference statistics given"):
        inception_fid(torch.zeros(2, 3, 8, 8), None, None, backend="pytorch-fid")
    with pytest.raises(GraftError, match="unknown FID backend 'clean-fid'"):
        inception_fid(torch.zeros(2, 3, 8, 8), None, None, backend="clean-fid")


def test_real_fid_reference_file_checks(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(4))
    with pytest.raises(GraftError, match="lack 'mu' and/or 'sigma'"):
        inc.load_reference_stats(bad)
    np.savez(bad, mu=np.zeros(4), sigma=np.zeros((3, 3)))
    with pytest.raises(GraftError, match="need \\(D,\\) and \\(D, D\\)"):
        inc.load_reference_stats(bad)


def test_real_fid_plumbing_with_a_stand_in_extractor(tmp_path, monkeypatch):
    """Everything but the network: uint8 quantisation, batching, stats files, the shared math."""
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"local weights")
    seen = {}

    def stand_in(backend, path, device):
        seen.update(backend=backend, path=path)
        return lambda x: x.float().flatten(1)[:, :24]  # (N, 24) from uint8 (N, 3, 4, 4)

    monkeypatch.setattr(inc, "installed_backends", lambda: ["pytorch-fid"])
    monkeypatch.setattr(inc, "_load_extractor", stand_in)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 4, 4, generator=g) * 2 - 1
    stats = inc.inception_reference_stats(real, weights, tmp_path / "ref.npz", batch_size=10)
    assert seen == {"backend": "pytorch-fid", "path": weights} and stats.n == 64
    assert inception_fid(real, tmp_path / "ref.npz", weights, batch_size=7) < 1e-9
    gray = torch.rand(64, 1, 4, 4, generator=g) * 2 - 1     # grey images become 3 equal channels
    assert inception_fid(gray, tmp_path / "ref.npz", weights) > 1.0
    monkeypatch.setattr(inc, "_load_extractor", lambda *a: (lambda x: x.float().flatten(1)[:, :8]))
    with pytest.raises(GraftError, match="have 24 dims but the extractor gives 8"):
        inception_fid(real, tmp_path / "ref.npz", weights)
    with pytest.raises(GraftError, match="decode latents to images first"):
        inception_fid(torch.zeros(2, 4, 4, 4), tmp_path / "ref.npz", weights)


# ---- grids --------------------------------------------------------------------------------------

def test_save_grid_writes_a_png_of_the_expected_size(tmp_path):
    from PIL import Image

    images = torch.full((23, 1, 8, 8), -1.0)
    images[0, 0, 0, 0] = 1.0
    path = save_grid(images, tmp_path / "grid.png", nrow=10, scale=3, pad=1)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (10 * (8 * 3 + 1) + 1, 3 * (8 * 3 + 1) + 1)
        px = np.asarray(im.convert("RGB"))
    assert px[0, 0].tolist() == [255, 255, 255]          # padding
    assert px[1, 1].tolist() == [255, 255, 255]          # the +1 pixel, scaled 3x
    assert px[1, 4].tolist() == [0, 0, 0]                # its -1 neighbour
    assert not list(tmp_path.glob(".*tmp*"))             # written atomically, nothing left over


def test_save_comparison_writes_labelled_rows(tmp_path):
    from PIL import Image

    rows = {"teacher": torch.full((10, 1, 8, 8), 1.0), "grafted (after)": torch.full((10, 1, 8, 8), -1.0)}
    path = save_comparison(rows, tmp_path / "cmp.png", scale=4, pad=1, title="same noise, same labels",
                           columns=[str(c) for c in range(10)], label_width=80)
    strip_w, strip_h = 10 * (8 * 4 + 1) + 1, 8 * 4 + 2
    top = 24 + 19                                        # title band + column band
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (80 + strip_w, top + 2 * strip_h)
        px = np.asarray(im.convert("RGB")).astype(int)
    assert px[top + 1 + 2, 80 + 1 + 2].tolist() == [255, 255, 255]            # teacher row: white images
    assert px[top + strip_h + 1 + 2, 80 + 1 + 2].tolist() == [0, 0, 0]        # second row: black images
    assert (px[:top, :, :] < 128).any()                  # the title/column text was drawn
    assert (px[top:, :80, :] < 128).any()                # the row labels were drawn


def test_grids_reject_bad_input(tmp_path):
    with pytest.raises(GraftError, match="grids need"):
        save_grid(torch.zeros(2, 4, 8, 8), tmp_path / "g.png")
    with pytest.raises(GraftError, match="different image sizes"):
        save_comparison({"a": torch.zeros(2, 1, 8, 8), "b": torch.zeros(2, 1, 4, 4)}, tmp_path / "c.png")


# ---- command line -------------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch):
    """graftfx.cli.main with the eval subcommand registered (restored afterwards)."""
    import graftfx.cli as c
    from graftfx.eval.cli import register

    commands, builders = {}, {}
    register(commands, builders)
    monkeypatch.setitem(c.COMMANDS, "eval", commands["eval"])
    monkeypatch.setitem(c._ARGS, "eval", builders["eval"])
    return c.main


def test_cli_help_explains_every_flag(cli, capsys):
    import argparse

    from graftfx.eval.cli import register

    commands, builders = {}, {}
    register(commands, builders)
    parser = argparse.ArgumentParser()
    builders["eval"](parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"train-classifier", "digits", "inception-fid"}
    for name, p in sub.choices.items():
        assert p.description
        for action in p._actions:
            assert action.help and len(action.help) > 8, (name, action.dest)
        with pytest.raises(SystemExit) as e:
            cli(["eval", name, "--help"])
        assert e.value.code == 0 and name in capsys.readouterr().out


def test_cli_train_classifier_writes_weights_and_card(cli, tmp_path, capsys):
    assert cli(["eval", "train-classifier", "--out", str(tmp_path), "--steps", "3", "--quiet"]) == 0
    model = load_classifier(tmp_path / "classifier.safetensors")
    assert model.feature_dim == 64
    card = (tmp_path / "classifier.md").read_text()
    assert f"--out {tmp_path} --steps 3" in card and "Held-out test accuracy" in card
    assert "test accuracy" in capsys.readouterr().out


def test_cli_digits_measures_a_checkpoint(cli, tiny_digits_dit, tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import save_file

    from graftfx.eval.cli import load_digits_dit

    tensors = {k: v.contiguous() for k, v in tiny_digits_dit.state_dict().items()}
    ckpt, bare = tmp_path / "digits.safetensors", tmp_path / "bare.safetensors"
    save_file(tensors, str(ckpt), metadata={"config": json.dumps(asdict(tiny_digits_dit.config))})
    save_file(tensors, str(bare))
    assert load_digits_dit(ckpt).config == tiny_digits_dit.config          # config from the metadata
    assert load_digits_dit(bare, num_heads=2).config == tiny_digits_dit.config
    with pytest.raises(GraftError, match="--num-heads 3 does not divide"):
        load_digits_dit(bare, num_heads=3)
    argv = ["eval", "digits", str(ckpt), "--n-per-class", "2", "--steps", "2", "--cfg", "1",
            "--json", str(tmp_path / "r.json"), "--grid", str(tmp_path / "g.png"), "--quiet"]
    assert cli(argv) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert (saved["n"], saved["steps"], saved["cfg_scale"], saved["sampler"], saved["seed"]) == (20, 2, 1.0, "ddpm", 0)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (10 * 33 + 1, 2 * 33 + 1)
    assert "digits-fid" in capsys.readouterr().out


def test_cli_real_fid_without_files_exits_2_with_one_line(cli, tmp_path, capsys):
    code = cli(["eval", "inception-fid", str(tmp_path / "s.npz"), "--weights", str(tmp_path / "w.pth"),
                "--reference", str(tmp_path / "ref.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "real FID cannot run" in err and "w.pth" in err
