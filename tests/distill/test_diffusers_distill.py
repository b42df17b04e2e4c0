"""``graftfx distill`` on a diffusers PixArt transformer (keyword inputs, caption embeddings and
masks, the pipeline's call): stage 1 lowers every region's loss, stage 2 runs, the export loads
back to identical outputs, and ``--resume`` continues where the run stopped."""
from __future__ import annotations

import json
import math

import torch
from safetensors.torch import save_file

import graftfx
from graftfx.cli import main
from graftfx.models.adapters import adapter_for
from graftfx.models.zoo import small_diffusers

RULES = """version = 1
[[rule]]
name = "attn-swa"
pattern = "self_attention"
operator = "swa"
select = { preset = "paper-50" }
options = { window = 2 }
[[rule]]
name = "cross-mha"
pattern = "cross_attention"
operator = "mha"
select = { indices = [0] }
options = { init = "fresh" }
"""


def _files(tmp_path, n=12):
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(n, 4, 8, 8, generator=g)}, str(tmp_path / "latents.safetensors"))
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[::3, 4:] = 0
    save_file({"embeddings": torch.randn(n, 6, 24, generator=g), "mask": mask}, str(tmp_path / "captions.safetensors"))
    (tmp_path / "rules.toml").write_text(RULES)


def _argv(tmp_path, steps1="24", extra=()):
    return ["distill", str(tmp_path / "rules.toml"), "--model", "diffusers:pixart",
            "--data", str(tmp_path / "latents.safetensors"), "--captions", str(tmp_path / "captions.safetensors"),
            "--samples", "16", "--shard-size", "8", "--steps1", steps1, "--batch1", "4", "--lr1", "2e-3",
            "--steps2", "2", "--batch2", "4", "--warmup2", "0", "--ckpt-every", "12", "--log-every", "4",
            "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run"), *extra]


def _losses(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [k for k in rows[0] if k.startswith("loss/")]
    return rows, {k: (rows[0][k], rows[-1][k]) for k in keys}


def test_distill_pixart_end_to_end_and_resume(tmp_path, capsys):
    _files(tmp_path)
    assert main(_argv(tmp_path)) == 0
    rows, losses = _losses(tmp_path / "run" / "stage1" / "metrics.jsonl")
    assert set(losses) == {"loss/transformer_blocks.1.attn1", "loss/transformer_blocks.3.attn1",
                           "loss/transformer_blocks.0.attn2"}
    assert all(last < first for first, last in losses.values()), losses
    stage2 = [json.loads(line) for line in (tmp_path / "run" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert stage2 and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in stage2)
    # the export rebuilds the same model on a fresh base (same seed as the CLI's)
    torch.manual_seed(0)
    base = small_diffusers("pixart")
    loaded = graftfx.load_grafted(base, tmp_path / "run" / "grafted", check_hash=False)
    _, kw = adapter_for(base).example(base, 3, text_length=6)
    state = loaded.state_dict()
    torch.manual_seed(0)
    again = graftfx.load_grafted(small_diffusers("pixart"), tmp_path / "run" / "grafted", check_hash=False)
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(loaded(**kw)[0], again(**kw)[0])
    # resume: 12 more stage-1 steps from the step-24 checkpoint, the first 24 rows kept as they were
    assert main(_argv(tmp_path, "36", ["--resume", "--stage", "1"])) == 0
    more, _ = _losses(tmp_path / "run" / "stage1" / "metrics.jsonl")
    assert [r["step"] for r in more] == list(range(4, 40, 4)) and more[:len(rows)] == rows


def test_stage2_drops_captions_to_the_empty_caption(tmp_path, capsys):
    """With the encoded empty caption, stage 2's conditioning dropout feeds it in place of the
    dropped captions (all of them at dropout 1); without it, nothing is dropped, and it says so."""
    from graftfx.distill.stage2 import Stage2Config, train_stage2
    from graftfx.models.adapters import PixArtAdapter

    torch.manual_seed(0)
    base = small_diffusers("pixart")
    base.spliced_parameters = lambda: iter(())   # what stage 2 asks of a grafted model; nothing to graft here
    seen = []

    class Spy(PixArtAdapter):
        def inputs(self, model, x_t, t, cond):
            seen.append((cond["embeddings"].clone(), cond["mask"].clone()))
            return super().inputs(model, x_t, t, cond)

    g = torch.Generator().manual_seed(0)
    cond = {"embeddings": torch.randn(8, 6, 24, generator=g), "mask": torch.ones(8, 6, dtype=torch.long)}
    null = {"embeddings": torch.randn(6, 24, generator=g), "mask": torch.tensor([1, 0, 0, 0, 0, 0])}
    latents = torch.randn(8, 4, 8, 8, generator=g)
    cfg = Stage2Config(steps=2, batch_size=4, class_dropout=1.0, warmup=0)
    for given in (null, None):
        seen.clear()
        train_stage2(base, None, latents, None, cfg, tmp_path / str(given is None), progress=False, adapter=Spy(),
                     base=base, conditioning=cond, unconditional=given)
        assert len(seen) == 2
        for emb, mask in seen:
            if given is None:   # kept: each row is one of the captions
                assert all(any(torch.equal(e, c) for c in cond["embeddings"]) for e in emb)
            else:
                assert all(torch.equal(e, null["embeddings"]) for e in emb)
                assert all(torch.equal(m, null["mask"]) for m in mask)
    assert "no unconditional input for this model" in capsys.readouterr().out


def test_distill_pixart_under_torchrun_with_fsdp_bf16(tmp_path):
    """Two ranks (gloo): stage 1 deals PixArt's regions to the ranks and lowers each one's loss;
    stage 2 runs FSDP2 in bf16 with every block recomputed in backward, on the exported graph (its
    fp32 casts meet bf16 weights under autocast); the gathered export loads and runs."""
    from .test_distributed import _run

    _files(tmp_path)
    argv = _argv(tmp_path, "8", ["--parallel", "fsdp", "--ckpt-every", "2", "--log-every", "2"])
    res = _run(argv, nproc=2)
    assert "stage 1 ranks:" in res.stdout
    seen = {}
    for rank in (0, 1):
        _, losses = _losses(tmp_path / "run" / "stage1" / f"metrics-rank{rank}.jsonl")
        seen.update(losses)
        stage2 = [json.loads(line)["loss/total"] for line in
                  (tmp_path / "run" / "stage2" / f"metrics-rank{rank}.jsonl").read_text().splitlines()]
        assert len(stage2) == 1 and all(math.isfinite(v) for v in stage2)
    assert set(seen) == {"loss/transformer_blocks.1.attn1", "loss/transformer_blocks.3.attn1",
                         "loss/transformer_blocks.0.attn2"}
    assert all(last < first for first, last in seen.values()), seen
    torch.manual_seed(0)
    base = small_diffusers("pixart")
    loaded = graftfx.load_grafted(base, tmp_path / "run" / "grafted", check_hash=False)
    _, kw = adapter_for(base).example(base, 2, text_length=6)
    with torch.no_grad():
        assert torch.isfinite(loaded(**kw)[0]).all()
