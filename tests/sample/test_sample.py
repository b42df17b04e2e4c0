"""DiTPipeline with a grafted transformer, and ``graftfx sample`` on a tiny DiT pipeline folder.

Tiny random components, no downloads: a 2-block AutoencoderKL, the DDIM scheduler and the small
DiT of ``graftfx.models.zoo`` with 1000 classes (DiTPipeline's guidance uses class 1000 as the
null class). The DiT is traced once (a module fixture): the copy (self-graft) and Hyena-X grafts
are spliced from the same trace.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from graftfx.cli import main  # noqa: E402
from graftfx.models.zoo import small_diffusers  # noqa: E402
from graftfx.rules import Rule, Select  # noqa: E402

COPY = [Rule(pattern="self_attention", operator="mha", select=Select(preset="all"), options={"init": "copy"},
             name="self_attention-copy")]
HYENA = [Rule(pattern="self_attention", operator="hyena_x", select=Select(indices=[0, 2]), options={},
              name="self_attention-hyena_x")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved DiTPipeline and a Hyena-X graft of its transformer saved beside it; the pipeline,
    the Hyena-X and the copy grafts."""
    from graftfx.export.pipeline import GraftedTransformer, pipeline_example
    from graftfx.select.select import select
    from graftfx.splice.splice import splice
    from graftfx.trace.tracer import trace

    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, sample_size=16)
    dit = diffusers.DiTTransformer2DModel.from_config({**small_diffusers("dit").config, "num_embeds_ada_norm": 1000})
    pipe = diffusers.DiTPipeline(transformer=dit.eval(), vae=vae.eval(), scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(root / "pipe")
    traced = trace(dit, (), pipeline_example(dit))
    grafted = GraftedTransformer(splice(select(traced, HYENA)), dit)
    copy = GraftedTransformer(splice(select(traced, COPY)), dit)
    with torch.no_grad():
        for p in grafted.grafted.spliced_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    grafted.save_pretrained(root / "grafted")
    return root, pipe, grafted, copy


def _png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _expected(pipe, labels, seed=0, steps=2, guidance=2.0) -> np.ndarray:
    """What DiTPipeline itself makes with the same settings, as saved PNG pixels."""
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images
    return (torch.as_tensor(images) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _run(pipe, transformer, steps=3):
    base = pipe.transformer
    pipe.transformer = transformer
    try:
        pipe.set_progress_bar_config(disable=True)
        pipe.to("cpu")
        return pipe(class_labels=[3, 999], num_inference_steps=steps, guidance_scale=3.0, output_type="pt",
                    generator=torch.Generator().manual_seed(2)).images
    finally:
        pipe.transformer = base


def test_dit_pipeline_grafted_and_copy(folders):
    _, pipe, hyena, copy = folders
    want = _run(pipe, pipe.transformer)
    got, grafted = _run(pipe, copy), _run(pipe, hyena)
    assert got.shape == grafted.shape == (2, 3, 16, 16)
    assert (got - want).abs().max() < 1e-5                      # the self-graft makes the base's images
    assert (grafted - want).abs().max() > 1e-3 and torch.isfinite(grafted).all()
    assert copy.graphs == hyena.graphs == 1                     # DiTPipeline's calls fit the trace
    assert copy.config is pipe.transformer.config


def test_sample_writes_pngs_grid_and_settings(folders, tmp_path, capsys):
    root, pipe, _, _ = folders
    out = tmp_path / "base"
    code = main(["sample", "--pipeline", str(root / "pipe"), "--out", str(out), "--labels", "3,7,999",
                 "--steps", "2", "--guidance", "2", "--batch-size", "3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    pngs = sorted(out.glob("0*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    got = np.stack([_png(p) for p in pngs])
    assert got.shape == (3, 16, 16, 3)
    assert np.abs(got.astype(int) - _expected(pipe, [3, 7, 999]).astype(int)).max() <= 1
    grid = _png(out / "grid.png")
    assert grid.shape == (2 * (64 + 2) + 2, 2 * (64 + 2) + 2, 3)       # 3 images, 2 per row, x4, pad 2
    first = np.repeat(np.repeat(got[0], 4, 0), 4, 1).astype(int)           # the first image, scaled x4
    assert np.abs(grid[2:66, 2:66].astype(int) - first).max() <= 1
    record = json.loads((out / "samples.json").read_text())
    assert record["labels"] == [3, 7, 999] and record["guidance"] == 2.0 and record["n"] == 3


def test_sample_with_grafted_transformer(folders, tmp_path, capsys):
    root, pipe, grafted, _ = folders
    out = tmp_path / "grafted"
    code = main(["sample", "--pipeline", str(root / "pipe"), "--grafted", str(root / "grafted"), "--out", str(out),
                 "--labels", "3,7", "--steps", "2", "--guidance", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    got = np.stack([_png(p) for p in sorted(out.glob("0*.png"))])
    base = pipe.transformer
    try:
        pipe.transformer = grafted                  # the graft before saving, in memory
        want = _expected(pipe, [3, 7])
    finally:
        pipe.transformer = base
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1         # saved, loaded, sampled: the same
    assert np.abs(got.astype(int) - _expected(pipe, [3, 7]).astype(int)).max() > 2   # and not the base's


@pytest.mark.parametrize("flags, missing", [
    (["--fid-ref", "ref.npz"], "--inception-weights"),
    (["--inception-weights", "w.pth"], "--fid-ref"),
    (["--fid-ref", "ref.npz", "--inception-weights", "w.pth"], "not found"),
])
def test_sample_fid_inputs_missing_exit_2(folders, tmp_path, capsys, flags, missing):
    root, _, _, _ = folders
    code = main(["sample", "--pipeline", str(root / "pipe"), "--out", str(tmp_path / "o"), "--quiet",
                 *[str(tmp_path / f) if f.endswith((".npz", ".pth")) else f for f in flags]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and missing in err, err
    assert not (tmp_path / "o").exists()           # nothing sampled or written


def test_sample_argument_errors(folders, tmp_path, capsys):
    root, _, _, _ = folders
    for argv, words in ((["--labels", "5000"], "classes 0..999"), (["--embeddings", str(tmp_path / "e.st")], "not found"),
                        (["--steps", "0"], "--steps 0")):
        code = main(["sample", "--pipeline", str(root / "pipe"), "--out", str(tmp_path / "o"), "--quiet", *argv])
        err = capsys.readouterr().err
        assert code == 2 and words in err, err


def test_sample_graftfx_dit_base_and_grafted(tmp_path, capsys):
    """graftfx's own DiT (the bundled digits model): its sampler, and a graft from an export folder."""
    import graftfx
    from graftfx.models.diffusion import sample
    from graftfx.models.zoo import resolve_model

    model, ex_args, _ = resolve_model("digits")
    grafted = graftfx.graft(model, "dit-xl2-mha-selfgraft-100p.toml", ex_args)   # fresh MHA: differs
    graftfx.export_grafted(grafted, tmp_path / "export")
    labels = [0, 4, 9]

    def direct(m):
        noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
        x = sample(m, torch.tensor(labels), steps=2, cfg_scale=1.5, generator=torch.Generator().manual_seed(5),
                   noise=noise, config=model.config)
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()

    want = {"base": direct(model), "grafted": direct(grafted)}
    assert np.abs(want["base"].astype(int) - want["grafted"].astype(int)).max() > 2      # the graft shows
    for name, extra in (("base", []), ("grafted", ["--grafted", str(tmp_path / "export")])):
        out = tmp_path / name
        code = main(["sample", "--model", "digits", *extra, "--out", str(out), "--labels", "0,4,9", "--steps", "2",
                     "--seed", "5", "--quiet"])
        assert code == 0, capsys.readouterr().err
        got = np.stack([_png(p)[..., 0] for p in sorted(out.glob("0*.png"))])
        assert got.shape == (3, 8, 8) and np.abs(got.astype(int) - want[name].astype(int)).max() <= 1, name
    code = main(["sample", "--out", str(tmp_path / "none"), "--quiet"])
    assert code == 2 and "--pipeline FOLDER" in capsys.readouterr().err
