"""`graftfx data latents` / `graftfx data captions` and their loaders, on a tiny random diffusers
AutoencoderKL, a tiny random T5 encoder and a word-level tokenizer, all saved to folders (no network):
values against the models run directly, labels from class folders, settings refused on a rerun, a
real SIGKILL between shards and the resume's bytes, the loaders' errors, the command line."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from graftfx.cli import main
from graftfx.data import encode_captions, encode_latents, load_caption_embeddings, load_latents
from graftfx.data.encode import PAUSE_ENV, captions_digest, class_labels, read_index
from graftfx.errors import GraftError
from graftfx.io import file_sha256

VAE_SCALE = 0.5          # the tiny VAE's own scaling_factor (not DiT's 0.18215, so the two are told apart)
# (class, name, width, height, PIL mode): odd sizes, one over 2x the side (box-halved first), grey and RGBA
IMAGES = [("cat", "a.png", 16, 16, "RGB"), ("cat", "b.jpg", 20, 24, "RGB"), ("cat", "c.png", 40, 36, "L"),
          ("dog", "d.png", 30, 17, "RGBA"), ("dog", "e.png", 29, 16, "RGB"), ("dog", "f.jpeg", 16, 21, "RGB")]
WORDS = "a photo of cat dog red blue sky tree small big on the".split()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("data")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16,
                        scaling_factor=VAE_SCALE)
    vae.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for cls, name, w, h, mode in IMAGES:
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode).save(root / "images" / cls / name)
    return root


@pytest.fixture(scope="module")
def vae(assets):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(assets / "vae", low_cpu_mem_usage=False).eval()


@pytest.fixture(scope="module")
def latents(assets):
    """The uninterrupted run every other latents test compares with: 3 shards of 2."""
    out = encode_latents(assets / "images", assets / "vae", assets / "whole", batch_size=2, shard_size=2,
                         progress=False)
    return out, *load_latents(out)


def _reference_pixels(path: Path, size: int) -> torch.Tensor:
    """The preprocessing written out again: halve (box) while the short side is >= 2 * size,
    bicubic to short side = size, centre crop, [-1, 1]."""
    im = Image.open(path).convert("RGB")
    while min(im.size) >= 2 * size:
        im = im.resize((im.size[0] // 2, im.size[1] // 2), Image.BOX)
    w, h = im.size
    w, h = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
    im = im.resize((w, h), Image.BICUBIC)
    x0, y0 = (w - size) // 2, (h - size) // 2
    arr = np.asarray(im, dtype=np.float32)[y0:y0 + size, x0:x0 + size]
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- latents -------------------------------------------------------------------------------------

def test_latents_are_the_scaled_posterior_mean_of_the_preprocessed_images(assets, vae, latents):
    out, x, y = latents
    order = sorted(f"{c}/{n}" for c, n, *_ in IMAGES)
    assert json.loads((out / "files.json").read_text()) == order
    assert x.shape == (6, 4, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    index = read_index(out)
    assert index["settings"]["classes"] == ["cat", "dog"] and index["settings"]["scale"] == VAE_SCALE
    assert index["complete"] and [s["count"] for s in index["shards"]] == [2, 2, 2]
    assert all(s["sha256"] == file_sha256(out / s["file"]) for s in index["shards"])
    pixels = torch.stack([_reference_pixels(assets / "images" / f, 16) for f in order])  # (6, 3, 16, 16)
    with torch.no_grad():
        want = vae.encode(pixels).latent_dist.mean * VAE_SCALE                          # (6, 4, 8, 8)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(x, vae.encode(pixels).latent_dist.mean, atol=1e-3)   # the scale is applied


def test_cli_scale_flag_overrides_the_vae_scaling_factor(assets, latents, capsys):
    _, x, y = latents
    out = assets / "dit-scale"
    code = main(["data", "latents", str(assets / "images"), "--vae", str(assets / "vae"), "--out", str(out),
                 "--scale", "0.18215", "--batch-size", "2", "--shard-size", "4", "--quiet"])
    assert code == 0
    assert "wrote 6 latents (4, 8, 8)" in capsys.readouterr().out
    x2, y2 = load_latents(out)
    torch.testing.assert_close(x2, x * (0.18215 / VAE_SCALE), rtol=1e-5, atol=1e-7)
    assert torch.equal(y2, y) and read_index(out)["settings"]["scale"] == 0.18215


def test_rerun_is_a_no_op_and_other_settings_are_refused(assets, latents):
    out = latents[0]
    before = _files(out)
    encode_latents(assets / "images", assets / "vae", out, batch_size=2, shard_size=2, progress=False)
    assert _files(out) == before
    with pytest.raises(GraftError, match=r"written with another scale \(0.5 vs 0.18215\); pick another --out"):
        encode_latents(assets / "images", assets / "vae", out, batch_size=2, shard_size=2, scale=0.18215,
                       progress=False)
    with pytest.raises(GraftError, match="written with another shard_size"):
        encode_latents(assets / "images", assets / "vae", out, shard_size=3, progress=False)
    assert _files(out) == before


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(assets, tmp_path):
    import fcntl

    (tmp_path / "o").mkdir()
    fd = os.open(tmp_path / "o" / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(GraftError, match="is being written by another process; wait for it"):
            encode_latents(assets / "images", assets / "vae", tmp_path / "o", progress=False)
    finally:
        os.close(fd)
    assert not (tmp_path / "o" / "index.json").exists()


def test_labels_from_class_folders():
    files = [Path("b/x.png"), Path("a/y.png"), Path("a/sub/z.png")]
    assert class_labels(files) == (["a", "b"], [1, 0, 0])
    assert class_labels(files, "none") == (None, [-1, -1, -1])
    assert class_labels([Path("x.png")]) == (None, [-1])
    with pytest.raises(GraftError, match="x.png is not inside a class folder"):
        class_labels(files + [Path("x.png")])
    with pytest.raises(GraftError, match="not inside a class folder"):
        class_labels([Path("x.png")], "folders")


def test_unreadable_image_is_named(assets, tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "imgs" / "good.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(GraftError, match=r"image .*broken.png cannot be read"):
        encode_latents(tmp_path / "imgs", assets / "vae", tmp_path / "out", progress=False)


def test_load_latents_refuses_what_is_not_a_complete_latents_folder(assets, latents, tmp_path):
    with pytest.raises(GraftError, match="not found, not a latents folder"):
        load_latents(tmp_path / "missing")
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(GraftError, match="is a file, not a latents folder"):
        load_latents(tmp_path / "file.safetensors")
    with pytest.raises(GraftError, match=r"not a latents folder \(no index.json\); make one with 'graftfx data"):
        load_latents(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "index.json").write_text(json.dumps({"format": 2, "samples": 4}))
    with pytest.raises(GraftError, match="not a graftfx data folder"):
        load_latents(tmp_path / "cache")

    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(latents[0], copy)
    data = bytearray((copy / "shard-00001.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "shard-00001.safetensors").write_bytes(bytes(data))
    with pytest.raises(GraftError, match="shard-00001.safetensors does not match its sha256"):
        load_latents(copy)
    index = json.loads((copy / "index.json").read_text())
    index["shards"], index["complete"] = index["shards"][:1], False
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(GraftError, match=r"incomplete \(1 of 3 shards\); rerun the same"):
        load_latents(copy)


@pytest.mark.slow
def test_sigkill_between_shards_then_rerun_gives_the_uninterrupted_bytes(assets, latents):
    out, marker = assets / "split", assets / "paused"
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    # the same intra-op thread count as this process, so the encoder's arithmetic is the same
    env.update(OMP_NUM_THREADS=str(torch.get_num_threads()), **{PAUSE_ENV: f"1:{marker}"})
    cmd = [sys.executable, "-m", "graftfx", "data", "latents", str(assets / "images"), "--vae", str(assets / "vae"),
           "--out", str(out), "--batch-size", "2", "--shard-size", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"ended (rc {proc.returncode}) before shard 1: {proc.stdout.read()[-2000:]}"
            assert time.monotonic() < deadline, "the writer never reached shard 1"
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no cleanup
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -9
    index = json.loads((out / "index.json").read_text())
    assert [s["index"] for s in index["shards"]] == [0] and not index["complete"]
    assert (out / "shard-00001.safetensors").exists()       # written, but not yet named by the index
    with pytest.raises(GraftError, match=r"incomplete \(1 of 3 shards\)"):
        load_latents(out)

    first = (out / "shard-00000.safetensors").stat().st_ino
    encode_latents(assets / "images", assets / "vae", out, batch_size=2, shard_size=2, progress=False)
    assert (out / "shard-00000.safetensors").stat().st_ino == first, "the rerun wrote shard 0 again"
    whole, split = _files(latents[0]), _files(out)
    assert whole.keys() == split.keys() and len(whole) == 6   # .lock, files.json, index.json, 3 shards
    differ = [name for name in whole if whole[name] != split[name]]
    assert not differ, f"differ from the uninterrupted run: {differ}"


# ---- captions ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("pipe")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # as T5
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=len(vocab),
                            pad_token_id=0, eos_token_id=1)).save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    return root


CAPTIONS = ["a photo of a cat", "a red dog on the sky", "big tree", "a small blue cat on a big red tree on the sky"]


def test_caption_embeddings_are_the_encoder_output_and_masks_count_tokens(pipe, tmp_path):
    from transformers import AutoTokenizer, T5EncoderModel

    (tmp_path / "caps.txt").write_text("\n".join(CAPTIONS[:2]) + "\n\n" + "\n".join(CAPTIONS[2:]) + "\n")
    out = encode_captions(tmp_path / "caps.txt", tmp_path / "emb", pipeline=pipe, max_length=10, batch_size=3,
                          shard_size=2, dtype="float32", progress=False)
    got = load_caption_embeddings(out)
    assert got["embeddings"].shape == (4, 10, 16) and got["embeddings"].dtype == torch.float32
    words = [len(c.split()) + 1 for c in CAPTIONS]                 # + the </s> the tokenizer appends
    assert got["mask"].sum(1).tolist() == [min(n, 10) for n in words] == [6, 7, 3, 10]
    assert got["mask"].dtype == torch.int64 and got["mask"][0].tolist() == [1] * 6 + [0] * 4

    tok = AutoTokenizer.from_pretrained(pipe / "tokenizer")
    enc = T5EncoderModel.from_pretrained(pipe / "text_encoder").eval()
    t = tok(CAPTIONS, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = enc(input_ids=t.input_ids, attention_mask=t.attention_mask).last_hidden_state  # (4, 10, 16)
    torch.testing.assert_close(got["embeddings"], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got["mask"], t.attention_mask)
    with safe_open(str(out / "shard-00000.safetensors"), "pt") as f:
        assert f.metadata()["captions_sha256"] == captions_digest(CAPTIONS)
    assert json.loads((out / "captions.json").read_text()) == CAPTIONS
    # the empty caption, encoded the same way: stage 2's unconditional input
    t = tok([""], padding="max_length", max_length=10, truncation=True, return_tensors="pt")
    with torch.no_grad():
        null = enc(input_ids=t.input_ids, attention_mask=t.attention_mask).last_hidden_state[0]   # (10, 16)
    torch.testing.assert_close(got["null_embeddings"], null, rtol=1e-5, atol=1e-6)
    assert got["null_mask"].tolist() == [1] + [0] * 9                    # just </s>

    # a .jsonl of objects; the default length (120 in a PixArtAlphaPipeline folder, else the tokenizer's
    # model_max_length 512 capped at 300) and dtype (float16)
    alpha = tmp_path / "alpha"
    alpha.mkdir()
    (alpha / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    for part in ("text_encoder", "tokenizer"):
        (alpha / part).symlink_to(pipe / part)
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n" for c in CAPTIONS[:2]))
    d = load_caption_embeddings(encode_captions(tmp_path / "caps.jsonl", tmp_path / "emb2", pipeline=alpha,
                                                progress=False))
    assert d["embeddings"].shape == (2, 120, 16) and d["embeddings"].dtype == torch.float16
    torch.testing.assert_close(d["embeddings"][:, :10].float(), want[:2].half().float(), rtol=0, atol=0)
    d = load_caption_embeddings(encode_captions(CAPTIONS[2:3], tmp_path / "emb3", text_encoder=pipe / "text_encoder",
                                                tokenizer=pipe / "tokenizer", progress=False))
    assert d["embeddings"].shape == (1, 300, 16) and d["mask"].sum().item() == 3

    with pytest.raises(GraftError, match=r"written with another max_length \(10 vs 12\)"):
        encode_captions(tmp_path / "caps.txt", tmp_path / "emb", pipeline=pipe, max_length=12, shard_size=2,
                        dtype="float32", progress=False)


def test_caption_embeddings_from_a_single_file_and_bad_inputs(tmp_path):
    from safetensors.torch import save_file

    e, m = torch.randn(3, 5, 8), torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.int32)
    save_file({"embeddings": e, "mask": m}, str(tmp_path / "emb.safetensors"))
    d = load_caption_embeddings(tmp_path / "emb.safetensors")
    assert torch.equal(d["embeddings"], e) and torch.equal(d["mask"], m.long())
    save_file({"embeddings": e, "mask": m, "null_embeddings": e[0].clone(), "null_mask": m[0].clone()}, str(tmp_path / "null.safetensors"))
    d = load_caption_embeddings(tmp_path / "null.safetensors")
    assert torch.equal(d["null_embeddings"], e[0]) and d["null_mask"].dtype == torch.int64
    save_file({"embeddings": e, "mask": m, "null_embeddings": e[0, :2].clone(), "null_mask": m[0].clone()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(GraftError, match=r"the empty caption's embedding is \[2, 8\] .* a caption's is \[5, 8\]"):
        load_caption_embeddings(tmp_path / "bad.safetensors")
    save_file({"prompt_embeds": e}, str(tmp_path / "other.safetensors"))
    with pytest.raises(GraftError, match="lacks embeddings, mask"):
        load_caption_embeddings(tmp_path / "other.safetensors")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(GraftError, match="holds a JSON dict, not a list"):
        encode_captions(tmp_path / "bad.json", tmp_path / "o", pipeline=tmp_path, progress=False)


# ---- command line --------------------------------------------------------------------------------

def cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_help_explains_every_flag(capsys):
    code, out, _ = cli(["data", "--help"], capsys)
    assert code == 0 and "latents" in out and "captions" in out
    code, out, _ = cli(["data", "latents", "--help"], capsys)
    assert code == 0 and all(f in out for f in ("IMAGES", "--vae", "--out", "--size", "--scale", "--batch-size",
                                                 "--shard-size", "--labels", "--workers", "0.18215"))
    code, out, _ = cli(["data", "captions", "--help"], capsys)
    assert code == 0 and all(f in out for f in ("--pipeline", "--text-encoder", "--tokenizer", "--max-length",
                                                 "--dtype", "300", "120"))


def test_cli_writes_the_folder(assets, latents, tmp_path, capsys):
    code, out, _ = cli(["data", "latents", str(assets / "images"), "--vae", str(assets / "vae"), "--out",
                        str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0 and "2 classes (cat, dog), in 1 shards" in out
    x, y = load_latents(tmp_path / "o")
    torch.testing.assert_close(x, latents[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(y, latents[2])


@pytest.mark.parametrize("argv, message", [
    pytest.param(["data"], "no DATA_COMMAND given; choose one of latents, captions", id="no-subcommand"),
    pytest.param(["data", "latents", "{t}/nope", "--vae", "{a}/vae", "--out", "{t}/o"],
                 "image folder {t}/nope not found", id="missing-images"),
    pytest.param(["data", "latents", "{a}/images", "--vae", "{t}/novae", "--out", "{t}/o"],
                 "VAE folder {t}/novae not found", id="missing-vae"),
    pytest.param(["data", "latents", "{a}/images", "--vae", "{a}/images", "--out", "{t}/o"],
                 "VAE folder {a}/images has no config.json", id="not-a-vae"),
    pytest.param(["data", "latents", "{a}/images", "--vae", "{a}/vae", "--out", "{t}/o", "--size", "9"],
                 "size 9: must be a positive multiple of 2", id="size"),
    pytest.param(["data", "latents", "{a}/images", "--vae", "{a}/vae", "--out", "{t}/o", "--scale", "0"],
                 "--scale 0.0: must be a finite number > 0", id="scale"),
    pytest.param(["data", "captions", "{t}/caps.txt", "--out", "{t}/o"], "no text encoder given", id="no-encoder"),
    pytest.param(["data", "captions", "{t}/missing.txt", "--pipeline", "{t}", "--out", "{t}/o"],
                 "captions file {t}/missing.txt not found", id="no-captions"),
])
def test_cli_user_errors_exit_2_with_one_line(assets, tmp_path, capsys, argv, message):
    (tmp_path / "caps.txt").write_text("a cat\n")
    fill = {"t": str(tmp_path), "a": str(assets)}
    code, _, err = cli([a.format(**fill) for a in argv] + ["--quiet"] * (len(argv) > 1), capsys)
    assert code == 2 and err.count("\n") == 1 and message.format(**fill) in err, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("shard-*"))
