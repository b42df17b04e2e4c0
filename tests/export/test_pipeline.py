"""Grafted diffusers transformers inside diffusers' own pipelines (graftfx/export/pipeline.py).

Tiny random components, no downloads: a 2-block AutoencoderKL, a default scheduler, the small
PixArt transformer of ``graftfx.models.zoo`` and precomputed prompt embeddings instead of a text
encoder. It is traced once (a module fixture); the copy (self-graft) and Hyena-X grafts are
spliced from the same trace. The DiTPipeline tests live in tests/sample/test_sample.py, which
traces the tiny DiT once for them and for ``graftfx sample``.
"""
from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from graftfx.errors import GraftError  # noqa: E402
from graftfx.export import read_manifest  # noqa: E402
from graftfx.export.pipeline import GraftedTransformer, load_grafted_transformer, pipeline_example  # noqa: E402
from graftfx.models.zoo import small_diffusers  # noqa: E402
from graftfx.rules import Rule, Select  # noqa: E402
from graftfx.select.select import select  # noqa: E402
from graftfx.splice.splice import splice  # noqa: E402
from graftfx.trace.tracer import trace  # noqa: E402

COPY = [Rule(pattern="self_attention", operator="mha", select=Select(preset="all"), options={"init": "copy"},
             name="self_attention-copy")]
HYENA = [Rule(pattern="self_attention", operator="hyena_x", select=Select(indices=[1, 3]), options={},
              name="self_attention-hyena_x")]
TEXT = 6     # prompt embedding length


def tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                   sample_size=16).eval()


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def pixart():
    """The base PixArt, its copy graft and its Hyena-X graft (one trace at latent 8 x 8)."""
    base = small_diffusers("pixart")
    traced = trace(base, (), pipeline_example(base, text_length=TEXT))
    copy = GraftedTransformer(splice(select(traced, COPY)), base)
    hyena = GraftedTransformer(splice(select(traced, HYENA)), base)
    with torch.no_grad():    # a Hyena-X far from zero, so a lost weight would show
        for p in hyena.grafted.spliced_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return base, copy, hyena, traced


def prompts():
    g = torch.Generator().manual_seed(7)
    emb, neg = torch.randn(2, TEXT, 24, generator=g), torch.randn(2, TEXT, 24, generator=g)
    mask, neg_mask = torch.ones(2, TEXT, dtype=torch.long), torch.ones(2, TEXT, dtype=torch.long)
    mask[1, 4:] = 0          # a padded caption
    neg_mask[:, 2:] = 0
    return dict(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_attention_mask=neg_mask, negative_prompt=None)


def run_pixart(transformer, vae, width=16, steps=2):
    pipe = diffusers.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                         scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    out = pipe(**prompts(), num_inference_steps=steps, height=16, width=width, guidance_scale=4.5,
               use_resolution_binning=False, output_type="pt", generator=torch.Generator().manual_seed(1))
    return out.images, pipe


@pytest.fixture(scope="module")
def pixart_images(pixart, vae):
    base, copy, hyena, _ = pixart
    return {name: run_pixart(model, vae) for name, model in (("base", base), ("copy", copy), ("hyena", hyena))}


def test_pixart_pipeline_runs_grafted_and_copy_equals_base(pixart, pixart_images):
    base, copy, hyena, _ = pixart
    images = {k: v[0] for k, v in pixart_images.items()}
    pipe = pixart_images["hyena"][1]
    assert pipe.transformer is hyena
    assert pipe.config["transformer"] == ("graftfx.export.pipeline", "GraftedTransformer")
    assert images["hyena"].shape == (2, 3, 16, 16) and torch.isfinite(images["hyena"]).all()
    assert (images["copy"] - images["base"]).abs().max() < 1e-5
    assert (images["hyena"] - images["base"]).abs().max() > 1e-3      # the graft does change the images
    # what the pipeline reads, from the base
    assert hyena.config is base.config and hyena.dtype == torch.float32 and hyena.device.type == "cpu"
    assert hyena.graphs == 1       # the pipeline's calls (mask, added_cond_kwargs, (B,) timesteps) fit the trace


def test_forward_signature_and_return_types(pixart):
    import inspect

    base, copy, hyena, _ = pixart
    assert inspect.signature(hyena.forward) == inspect.signature(base.forward)
    ex = pipeline_example(base, batch=3, text_length=TEXT)
    want = base(**ex)[0]
    positional = copy(ex["hidden_states"], ex["encoder_hidden_states"], timestep=ex["timestep"],
                      encoder_attention_mask=ex["encoder_attention_mask"], added_cond_kwargs=None)
    assert type(positional).__name__ == "Transformer2DModelOutput"          # return_dict defaults to True
    assert (positional.sample - want).abs().max() < 1e-5
    out = copy(**{**ex, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}})
    assert isinstance(out, tuple) and (out[0] - want).abs().max() < 1e-5
    with pytest.raises(GraftError, match="does not take"):
        copy(ex["hidden_states"], nonsense=1)


def test_two_resolutions_share_parameters(pixart, pixart_images, vae):
    base, copy, hyena, _ = pixart
    wide, _ = run_pixart(copy, vae, width=24)              # latent 8 x 12: traced again, spliced, shared
    assert wide.shape == (2, 3, 16, 24)
    assert copy.graphs == 2
    reference, _ = run_pixart(base, vae, width=24)
    assert (wide - reference).abs().max() < 1e-5
    square, _ = run_pixart(copy, vae)                      # the first graph is still there and right
    assert (square - pixart_images["base"][0]).abs().max() < 1e-5 and copy.graphs == 2
    graphs = [g for g, _ in copy._graphs.values()]
    other = next(g for g in graphs if g is not copy.grafted)
    own = {n: p.data_ptr() for n, p in copy.grafted.named_parameters()}
    shared = dict(other.named_parameters())
    assert shared and all(own[n] == p.data_ptr() for n, p in shared.items())
    spliced = {g.target for g in other.grafts}
    assert spliced == {g.target for g in copy.grafted.grafts}
    for target in spliced:
        a, b = copy.grafted.get_submodule(target), other.get_submodule(target)
        assert a is not b and all(p is q for p, q in zip(a.parameters(), b.parameters()))


def test_other_resolution_selecting_other_regions_is_refused(pixart, monkeypatch):
    base, copy, hyena, traced = pixart
    import importlib

    tracer = importlib.import_module("graftfx.trace.tracer")
    monkeypatch.setattr(tracer, "trace", lambda *a, **k: traced)    # no second trace needed
    monkeypatch.setattr(hyena, "_regions", [("self_attention-hyena_x", "transformer_blocks.0.attn1",
                                             "transformer_blocks.0.attn1")])
    with pytest.raises(GraftError, match="same region paths"):
        hyena(**pipeline_example(base, width=12, text_length=TEXT))
    assert hyena.graphs == 1


def test_save_pretrained_and_load(pixart, tmp_path):
    base, copy, hyena, _ = pixart
    folder = tmp_path / "grafted"
    folder.mkdir()
    (folder / "README.md").write_text("mine\n")
    hyena.save_pretrained(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "config.json", "graft.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "PixArtTransformer2DModel" and config["num_layers"] == base.config.num_layers
    manifest = read_manifest(folder)
    assert [r["path"] for r in manifest["regions"]] == ["transformer_blocks.1.attn1", "transformer_blocks.3.attn1"]
    assert manifest["settings"]["pipeline"]["same_as_none"] == ["added_cond_kwargs"]
    loaded = load_grafted_transformer(folder)            # base=None: the class from config.json, random init
    ex = pipeline_example(base, batch=3, text_length=TEXT)
    with torch.no_grad():
        want, got = hyena(**ex)[0], loaded(**ex)[0]
        assert (want - base(**ex)[0]).abs().max() > 1e-3
    assert torch.equal(want, got)
    shared = {p.data_ptr() for p in loaded.grafted.parameters()}
    assert any(p.data_ptr() in shared for p in loaded.base_model.parameters())     # one copy of the weights
    with pytest.raises(GraftError, match="was grafted onto"):
        load_grafted_transformer(folder, base=small_diffusers("dit"))


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(GraftError, match="not found"):
        load_grafted_transformer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraftError, match="graft.json"):
        load_grafted_transformer(tmp_path / "empty")


def test_sample_guides_with_the_empty_caption_the_embeddings_carry(pixart, vae):
    """``graftfx data captions`` stores the empty caption's embedding; ``sample_images`` guides
    with it when no --negative is given: the same images as the pipeline called with it."""
    from graftfx.sample.sample import sample_images

    base = pixart[0]
    p = prompts()
    null, null_mask = p["negative_prompt_embeds"][0], p["negative_prompt_attention_mask"][0]
    _, pipe = run_pixart(base, vae, steps=1)
    embeddings = {"embeddings": p["prompt_embeds"], "mask": p["prompt_attention_mask"],
                  "null_embeddings": null, "null_mask": null_mask}
    got, settings = sample_images(pipe, embeddings=embeddings, steps=2, seed=3, guidance=4.5, height=16, width=16,
                                  progress=False)
    want = pipe(prompt_embeds=p["prompt_embeds"], prompt_attention_mask=p["prompt_attention_mask"],
                negative_prompt_embeds=null.expand(2, -1, -1), negative_prompt_attention_mask=null_mask.expand(2, -1),
                negative_prompt=None, num_inference_steps=2, guidance_scale=4.5, height=16, width=16,
                generator=torch.Generator().manual_seed(3), output_type="pt", use_resolution_binning=False).images
    assert settings["guidance"] == 4.5
    assert torch.equal(got, torch.as_tensor(want).float() * 2 - 1)
    without = {k: v for k, v in embeddings.items() if not k.startswith("null")}
    with pytest.raises(GraftError, match="needs negative prompt embeddings"):
        sample_images(pipe, embeddings=without, steps=1, guidance=4.5, height=16, width=16, progress=False)
