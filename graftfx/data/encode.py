"""Data preparation for distilling diffusers models: images -> VAE latents, captions -> text-encoder
embeddings, each as a folder of safetensors shards that an interrupted run continues.

Layout of an output folder (``graftfx data latents`` / ``graftfx data captions``)::

    index.json                  kind ("latents" or "captions"), count, shard size, the settings the
                                data depends on (VAE / text encoder config and weight digest, scale,
                                size, max length, dtype, the source's digest) and, per complete
                                shard, its file, first row, row count and sha256
    files.json | captions.json  the source: image paths (relative, in row order) or the captions
    shard-00000.safetensors     rows [0, shard_size): latents (N, C, h, w) float32 and labels (N,)
                                int64, or embeddings (N, L, D) and mask (N, L) int64

Latents are the VAE posterior's **mean** (not a sample: deterministic, so a rerun and a resume
give the same bytes), minus the VAE's ``shift_factor`` where its config has one, times the scale
(the VAE's ``scaling_factor``, or the ``scale`` given, e.g. DiT's 0.18215). Images are converted
to RGB, resized and centre-cropped to ``size`` the way DiT/ADM prepare ImageNet (halve with a box
filter while the short side is at least twice ``size``, bicubic-resize the short side to ``size``,
crop the centre), and mapped to [-1, 1]. Labels come from ImageNet-style class folders
(``IMAGES/<class>/...``): the class names sorted, label = position; unlabelled images get -1.

Every file is written to a temporary name and renamed; ``index.json`` is rewritten after each
shard, so a killed run leaves whole shards only and the same command continues after the last
one the index names, producing the same bytes as an uninterrupted run (with the same batch size
and thread count: the encoder's arithmetic). A rerun with other settings is refused. One writer
per folder at a time (``flock`` on ``.lock``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from graftfx.errors import GraftError, first_line
from graftfx.io import atomic_save_safetensors, atomic_write_json, file_sha256, test_pause

FORMAT = 1
INDEX = "index.json"
NULL_CAPTION = "null.safetensors"   # the empty caption, encoded: the unconditional input of text models
LOCK = ".lock"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Without a pipeline class that says otherwise, captions are padded to the tokenizer's
# model_max_length, capped here (PixArt-Sigma's length; T5 tokenizers say 512 or "unlimited").
MAX_LENGTH_CAP = 300
PIPELINE_MAX_LENGTH = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}
# Tests only: "K:MARKER" makes the writer create MARKER and sleep after shard K's file is in place
# but before the index names it, so a test can SIGKILL it there.
PAUSE_ENV = "GRAFTFX_TEST_ENCODE_PAUSE"


# ---------------------------------------------------------------------------------------------
# images -> latents
# ---------------------------------------------------------------------------------------------

def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden entries skipped), relative, sorted by path."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel.parts) and p.is_file():
            found.append(rel)
    return sorted(found, key=lambda r: r.as_posix())


def class_labels(files: list[Path], mode: str = "auto") -> tuple[list[str] | None, list[int]]:
    """(class names or None, one label per file) from ImageNet-style folders ``<class>/...``.

    ``mode``: "folders" (every image must sit in a class folder), "none" (all -1), "auto"
    (folders when every image is in one, none when none is; a mix is an error)."""
    if mode not in ("auto", "folders", "none"):
        raise GraftError(f"labels mode {mode!r} is not one of auto, folders, none")
    loose = [f for f in files if len(f.parts) < 2]
    if mode == "none" or (mode == "auto" and len(loose) == len(files)):
        return None, [-1] * len(files)
    if loose:
        raise GraftError(f"image {loose[0]} is not inside a class folder but {len(files) - len(loose)} others are; "
                         "put every image in IMAGES/<class>/, or pass --labels none")
    classes = sorted({f.parts[0] for f in files})
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[f.parts[0]] for f in files]


def center_crop(image, size: int):
    """DiT/ADM's ImageNet preprocessing: box-halve while the short side >= 2 * size, bicubic-resize
    the short side to ``size``, crop the centre ``size`` x ``size``. PIL image in, PIL image out."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    k = size / min(image.size)
    image = image.resize(tuple(round(s * k) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: Path, size: int, channels: int = 3) -> torch.Tensor:
    """One image file as a (C, size, size) float32 tensor in [-1, 1]; an unreadable file is a
    GraftError naming it."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise GraftError(f"image {path} cannot be read ({first_line(e)}); replace or remove it (removing changes the "
                         "file list: then use a new --out)") from None
    arr = np.asarray(center_crop(im, size), dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)  # (C, size, size)


def load_vae(folder, device="cpu"):
    """A diffusers ``AutoencoderKL`` from a local folder (or a pipeline folder's ``vae/``); no network."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GraftError(f"VAE folder {folder} not found; give a local diffusers AutoencoderKL folder (config.json "
                         "and weights) or a pipeline folder holding vae/")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise GraftError(f"VAE folder {folder} has no config.json; give a diffusers AutoencoderKL folder (as "
                         "save_pretrained writes it) or a pipeline folder holding vae/")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise GraftError("encoding images needs diffusers; pip install diffusers") from None
    try:
        quiet = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}  # no warning
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, **quiet)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise GraftError(f"VAE folder {folder} does not load as an AutoencoderKL ({first_line(e)}); give a diffusers "
                         "AutoencoderKL folder") from None
    return vae.to(device).float().eval(), folder


def _config_record(config) -> dict:
    """A model config as plain JSON (private ``_`` keys other than ``_class_name``, and the library
    version, dropped: they hold versions and paths, not what the model computes)."""
    items = {k: v for k, v in dict(config).items()
             if (not k.startswith("_") or k == "_class_name") and k != "transformers_version"}
    return json.loads(json.dumps(items, sort_keys=True, default=str))


def state_digest(module: torch.nn.Module) -> str:
    """sha256 (16 hex) of a module's state: names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def encode_latents(images, vae, out, *, size: int | None = None, batch_size: int = 32, shard_size: int = 1024,
                   scale: float | None = None, labels: str = "auto", device="cpu", workers: int = 4,
                   progress: bool = True) -> Path:
    """Encode the images under folder ``images`` (png/jpg, recursive, sorted by relative path)
    into VAE latents in the folder ``out`` (see the module docstring for the layout).

    ``vae``: a local diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``).
    ``size``: image side (default the VAE's ``config.sample_size``); the latents are
    ``size / 2**(len(block_out_channels) - 1)`` on a side. ``scale``: multiplies the posterior
    mean (default the VAE's ``config.scaling_factor``). ``labels``: see ``class_labels``.
    ``workers``: threads that decode and resize images (at most 8). Resumes an interrupted run; returns ``out``.
    """
    _check_count("batch_size", batch_size)
    _check_count("shard_size", shard_size)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise GraftError(f"scale {scale}: must be a finite number > 0 (DiT uses 0.18215)")
    src = Path(images)
    if not src.is_dir():
        raise GraftError(f"image folder {src} not found; give a folder of .png/.jpg images (class sub-folders for labels)")
    files = list_images(src)
    if not files:
        raise GraftError(f"image folder {src} holds no .png/.jpg/.jpeg files; give a folder of images")
    classes, label_list = class_labels(files, labels)
    model, vae_folder = load_vae(vae, device)
    cfg = model.config
    size = int(cfg.sample_size if size is None else size)
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if size < 1 or size % factor:
        raise GraftError(f"size {size}: must be a positive multiple of {factor} (the VAE's downsampling factor)")
    if cfg.in_channels not in (1, 3):
        raise GraftError(f"VAE {vae_folder} takes {cfg.in_channels} input channels; only 1 (grey) or 3 (RGB) images "
                         "can be encoded")
    scale = float(cfg.scaling_factor if scale is None else scale)
    shift = getattr(cfg, "shift_factor", None)
    names = [f.as_posix() for f in files]
    settings = {"images_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(), "classes": classes,
                "labels": labels, "size": size, "scale": scale, "shift": shift, "latent": "mean",
                "dtype": "float32", "latent_shape": [cfg.latent_channels, size // factor, size // factor],
                "vae_config": _config_record(cfg), "vae_weights": state_digest(model)}
    y_all = torch.tensor(label_list, dtype=torch.int64)

    def read(i: int) -> torch.Tensor:
        return load_image(src / files[i], size, cfg.in_channels)

    def make_shard(start: int, stop: int, bar) -> dict[str, torch.Tensor]:
        parts = []
        for b in range(start, stop, batch_size):
            x = torch.stack(list(pool.map(read, range(b, min(stop, b + batch_size))))).to(device)  # (B, 3, size, size)
            with torch.inference_mode():
                z = model.encode(x).latent_dist.mean                                   # (B, C, h, w)
            if shift is not None:
                z = z - shift
            parts.append((z * scale).float().cpu())
            bar.update(len(x))
        return {"latents": torch.cat(parts), "labels": y_all[start:stop].clone()}

    info = {"vae_folder": str(vae_folder), "images_folder": str(src)}
    # PIL decodes and resizes without the GIL: a few threads keep an accelerator fed (each image is
    # prepared on its own, so the result does not depend on the thread count)
    with ThreadPoolExecutor(max_workers=max(1, min(8, workers))) as pool:
        return _write_sharded(Path(out), "latents", settings, len(files), shard_size, make_shard,
                              source=("files.json", names), info=info, progress=progress, desc="encode latents",
                              unit="img")


# ---------------------------------------------------------------------------------------------
# captions -> embeddings
# ---------------------------------------------------------------------------------------------

_CAPTION_KEYS = ("caption", "text", "prompt")


def read_captions(source) -> list[str]:
    """Captions from a list of strings, a text file (one per line, blank lines skipped), a .json
    list, or a .jsonl file (one per line); JSON items are strings or objects with a "caption",
    "text" or "prompt" string."""
    if isinstance(source, (list, tuple)):
        items, where = list(source), "captions"
    else:
        path = Path(source)
        if not path.is_file():
            raise GraftError(f"captions file {path} not found; give a .txt (one caption per line), .json or .jsonl file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise GraftError(f"captions file {path} is not UTF-8 text ({first_line(e)}); save it as UTF-8") from None
        suffix = path.suffix.lower()
        try:
            if suffix == ".json":
                items = json.loads(text)
                if not isinstance(items, list):
                    raise GraftError(f"captions file {path} holds a JSON {type(items).__name__}, not a list; give a "
                                     "list of captions")
            elif suffix == ".jsonl":
                items = []
                for n, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            items.append(json.loads(line))
                        except ValueError as e:
                            raise GraftError(f"captions file {path} line {n} is not JSON ({first_line(e)}); one JSON "
                                             "string or object per line") from None
            else:
                items = [line.strip() for line in text.splitlines() if line.strip()]
        except ValueError as e:
            if isinstance(e, GraftError):
                raise
            raise GraftError(f"captions file {path} is not valid JSON ({first_line(e)}); fix it, or use a .txt with "
                             "one caption per line") from None
        where = f"captions file {path}"
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            item = next((item[k] for k in _CAPTION_KEYS if isinstance(item.get(k), str)), None)
        if not isinstance(item, str):
            raise GraftError(f"{where}: item {i} is not a string nor an object with a caption/text/prompt string")
        out.append(item)
    if not out:
        raise GraftError(f"{where} holds no captions")
    return out


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()[:16]


def _text_folders(pipeline, text_encoder, tokenizer) -> tuple[Path, Path, str | None]:
    pipe = Path(pipeline) if pipeline is not None else None
    if pipe is not None and not pipe.is_dir():
        raise GraftError(f"pipeline folder {pipe} not found; give a local diffusers pipeline folder (with "
                         "text_encoder/ and tokenizer/)")
    te = Path(text_encoder) if text_encoder is not None else (pipe / "text_encoder" if pipe else None)
    tok = Path(tokenizer) if tokenizer is not None else (pipe / "tokenizer" if pipe else None)
    if te is None or tok is None:
        raise GraftError("no text encoder given: pass --pipeline FOLDER, or both --text-encoder and --tokenizer")
    for what, folder in (("text encoder", te), ("tokenizer", tok)):
        if not folder.is_dir():
            raise GraftError(f"{what} folder {folder} not found; give a local folder as save_pretrained writes it")
    pipe_class = None
    if pipe is not None and (pipe / "model_index.json").is_file():
        try:
            pipe_class = json.loads((pipe / "model_index.json").read_text()).get("_class_name")
        except (ValueError, AttributeError, UnicodeDecodeError):
            pipe_class = None
    return te, tok, pipe_class


def load_text_encoder(folder: Path, dtype=torch.float32, device="cpu"):
    """transformers text encoder from a local folder: the encoder-only class for T5-family
    configs (``T5EncoderModel``), else ``AutoModel``. No network."""
    try:
        import transformers
    except ImportError:
        raise GraftError("encoding captions needs transformers; pip install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        cls = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}.get(config.model_type,
                                                                                                "AutoModel")
        model = getattr(transformers, cls).from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise GraftError(f"text encoder folder {folder} does not load ({first_line(e)}); give a transformers "
                         "model folder (config.json and weights)") from None
    return model.to(device).eval()


def load_tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise GraftError("encoding captions needs transformers; pip install transformers") from None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise GraftError(f"tokenizer folder {folder} does not load ({first_line(e)}); give a transformers "
                         "tokenizer folder") from None


def encode_captions(captions, out, *, pipeline=None, text_encoder=None, tokenizer=None, max_length: int | None = None,
                    batch_size: int = 16, shard_size: int = 256, dtype: str = "float16", encoder_dtype: str = "float32",
                    device="cpu", progress: bool = True) -> Path:
    """Encode ``captions`` (see ``read_captions``) with a local pipeline's text encoder into the
    folder ``out`` (sharded and resumable like ``encode_latents``).

    ``pipeline``: a diffusers pipeline folder (``text_encoder/`` and ``tokenizer/`` in it);
    ``text_encoder`` / ``tokenizer``: folders that override its parts. Each caption is tokenized as
    PixArt's pipelines do (``padding="max_length"``, truncation, special tokens) and run through the
    encoder with its attention mask; rows hold ``embeddings`` (N, L, D) in ``dtype`` (the encoder's
    output at every position, padding included) and ``mask`` (N, L) int64. ``max_length`` L
    defaults to 300 for a PixArtSigmaPipeline folder, 120 for PixArtAlphaPipeline, else the
    tokenizer's ``model_max_length`` capped at 300. Returns ``out``.
    """
    _check_count("batch_size", batch_size)
    _check_count("shard_size", shard_size)
    if dtype not in DTYPES or encoder_dtype not in DTYPES:
        bad = dtype if dtype not in DTYPES else encoder_dtype
        raise GraftError(f"dtype {bad!r} is not one of {', '.join(DTYPES)}")
    texts = read_captions(captions)
    te_folder, tok_folder, pipe_class = _text_folders(pipeline, text_encoder, tokenizer)
    tok = load_tokenizer(tok_folder)
    if tok.pad_token is None:
        raise GraftError(f"tokenizer {tok_folder} has no pad token; captions are padded to --max-length, so it needs one")
    if max_length is None:
        limit = tok.model_max_length if isinstance(tok.model_max_length, int) and tok.model_max_length > 0 else None
        max_length = PIPELINE_MAX_LENGTH.get(pipe_class) or min(limit or MAX_LENGTH_CAP, MAX_LENGTH_CAP)
    _check_count("max_length", max_length)
    encoder = load_text_encoder(te_folder, DTYPES[encoder_dtype], device)
    store = DTYPES[dtype]
    settings = {"captions_sha256": captions_digest(texts), "max_length": int(max_length), "dtype": dtype,
                "encoder_dtype": encoder_dtype, "encoder_config": _config_record(encoder.config.to_dict()),
                "encoder_weights": state_digest(encoder), "tokenizer": _folder_digest(tok_folder)}

    def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        t = tok(batch, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                return_tensors="pt")
        ids, mask = t.input_ids.to(device), t.attention_mask.to(device)       # (B, L)
        with torch.inference_mode():
            h = encoder(input_ids=ids, attention_mask=mask)[0]                 # (B, L, D)
        return h.to(store).cpu(), mask.long().cpu()

    def make_shard(start: int, stop: int, bar) -> dict[str, torch.Tensor]:
        embs, masks = [], []
        for b in range(start, stop, batch_size):
            batch = texts[b:min(stop, b + batch_size)]
            h, mask = encode(batch)
            embs.append(h)
            masks.append(mask)
            bar.update(len(batch))
        return {"embeddings": torch.cat(embs), "mask": torch.cat(masks)}

    info = {"text_encoder_folder": str(te_folder), "tokenizer_folder": str(tok_folder), "pipeline": pipe_class}
    out = _write_sharded(Path(out), "captions", settings, len(texts), shard_size, make_shard,
                         source=("captions.json", texts), info=info, progress=progress, desc="encode captions",
                         unit="caption", metadata={"captions_sha256": settings["captions_sha256"]})
    null = out / NULL_CAPTION
    if not null.is_file():   # the empty caption, as the pipelines encode it: stage 2's unconditional input
        h, mask = encode([""])
        atomic_save_safetensors(null, {"null_embeddings": h[0].clone(), "null_mask": mask[0].clone()},
                                {"captions_sha256": settings["captions_sha256"]})
    return out


def captions_digest(captions: list[str]) -> str:
    """sha256 of the captions as a JSON list (UTF-8): what the shards' metadata records."""
    return hashlib.sha256(json.dumps(list(captions), ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# the sharded writer both commands use
# ---------------------------------------------------------------------------------------------

def _check_count(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise GraftError(f"{name} {value!r}: must be an integer >= 1")


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


@contextlib.contextmanager
def _lock(folder: Path):
    import fcntl

    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise GraftError(f"{folder} is being written by another process; wait for it to finish or pick "
                                 "another --out") from None
            raise
        yield
    finally:
        os.close(fd)


def _differs(old: dict, new: dict) -> str | None:
    """The first differing setting, named (nested config keys as ``vae_config.key``)."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                sub = _differs(a, b)
                return f"{key}.{sub.split(' ', 1)[0]}" if sub else key
            shown = f" ({a!r} vs {b!r})" if len(repr(a)) + len(repr(b)) < 80 else ""
            return f"{key}{shown}"
    return None


def _write_sharded(out: Path, kind: str, settings: dict, count: int, shard_size: int,
                   make_shard: Callable[[int, int, object], dict[str, torch.Tensor]], *, source: tuple[str, list],
                   info: dict, progress: bool, desc: str, unit: str, metadata: dict | None = None) -> Path:
    if out.exists() and not out.is_dir():
        raise GraftError(f"--out {out} is a file; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraftError(f"--out {out} cannot be created ({e.strerror or e}); give another folder") from None
    with _lock(out):
        index_path = out / INDEX
        fresh = {"format": FORMAT, "kind": kind, "count": count, "shard_size": shard_size, "settings": settings,
                 "source": source[0], "info": info, "complete": False, "shards": []}
        if index_path.exists():
            old = _read_index(out, kind)
            for key in ("count", "shard_size"):
                if old[key] != fresh[key]:
                    raise GraftError(f"folder {out} was written with another {key} ({old[key]} vs {fresh[key]}); pick "
                                     "another --out or delete it")
            what = _differs(old.get("settings") or {}, settings)
            if what:
                raise GraftError(f"folder {out} was written with another {what}; pick another --out or delete it")
            index = dict(fresh, shards=[s for s in old["shards"] if _shard_ok(out, s)])
        else:
            stray = [p.name for p in out.iterdir() if not p.name.startswith(".")]
            if stray:
                raise GraftError(f"--out {out} already holds files ({stray[0]}, ...) and no {INDEX}; pick another "
                                 "--out or empty it")
            index = fresh
        for p in out.glob(".*.tmp"):     # what a killed writer left half written (we hold the lock)
            p.unlink()
        _save(out / source[0], lambda p: atomic_write_json(p, source[1]))
        _save(index_path, lambda p: atomic_write_json(p, index))
        done = {s["index"] for s in index["shards"]}
        todo = [k for k in range(math.ceil(count / shard_size)) if k not in done]
        left = sum(min(count, (k + 1) * shard_size) - k * shard_size for k in todo)
        with tqdm(total=left, desc=desc, unit=unit, disable=not progress) as bar:
            for k in todo:
                start, stop = k * shard_size, min(count, (k + 1) * shard_size)
                tensors = make_shard(start, stop, bar)
                path = out / _shard_name(k)
                _save(path, lambda p: atomic_save_safetensors(p, tensors, metadata))
                entry = {"index": k, "file": path.name, "start": start, "count": stop - start,
                         "sha256": file_sha256(path)}
                _pause(k)
                index["shards"] = sorted([s for s in index["shards"] if s["index"] != k] + [entry],
                                         key=lambda s: s["index"])
                _save(index_path, lambda p: atomic_write_json(p, index))
        index["complete"] = True
        _save(index_path, lambda p: atomic_write_json(p, index))
    return out


def _save(path: Path, write) -> None:
    try:
        write(path)
    except OSError as e:
        reason = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise GraftError(f"writing {path} failed: {reason}; the shards written so far are kept: fix that and rerun "
                         "the same command to continue") from None


def _pause(k: int) -> None:
    test_pause(PAUSE_ENV, k)


def _shard_ok(folder: Path, entry: dict) -> bool:
    path = folder / entry["file"]
    return path.is_file() and file_sha256(path) == entry["sha256"]


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

_MAKE = {"latents": "graftfx data latents IMAGES --vae VAE --out FOLDER",
         "captions": "graftfx data captions FILE --pipeline PIPELINE --out FOLDER"}


def _read_index(folder: Path, kind: str) -> dict:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise GraftError(f"{path} is not valid JSON; delete {folder} and write it again with '{_MAKE[kind]}'") from None
    if not isinstance(index, dict) or index.get("kind") not in _MAKE:
        raise GraftError(f"{folder} is not a graftfx data folder (its {INDEX} is another tool's); make one with "
                         f"'{_MAKE[kind]}'")
    if index["kind"] != kind:
        raise GraftError(f"{folder} holds {index['kind']}, not {kind}; make {kind} with '{_MAKE[kind]}'")
    if index.get("format") != FORMAT:
        raise GraftError(f"{folder} has data format {index.get('format')!r}, not {FORMAT}; write it again in a new folder")
    ok = (isinstance(index.get("count"), int) and isinstance(index.get("shard_size"), int)
          and isinstance(index.get("shards"), list) and isinstance(index.get("settings"), dict)
          and all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("sha256"), str)
                  and isinstance(s.get("index"), int) and isinstance(s.get("count"), int) for s in index["shards"]))
    if not ok:
        raise GraftError(f"{path} is damaged (a field is missing or has the wrong type); delete {folder} and write it "
                         "again")
    return index


def read_index(folder, kind: str = "latents") -> dict:
    """The ``index.json`` of a latents or captions folder (settings: scale, size, classes, ...)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "a file" if folder.exists() else "not found"
        raise GraftError(f"{folder} is {what}, not a {kind} folder; make one with '{_MAKE[kind]}'")
    if not (folder / INDEX).is_file():
        raise GraftError(f"{folder} is not a {kind} folder (no {INDEX}); make one with '{_MAKE[kind]}'")
    return _read_index(folder, kind)


def _read_shards(folder: Path, kind: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = read_index(folder, kind)
    k = math.ceil(index["count"] / index["shard_size"]) if index["shard_size"] > 0 else 0
    if not index.get("complete") or len(index["shards"]) != k:
        raise GraftError(f"{folder} is incomplete ({len(index['shards'])} of {k} shards); rerun the same 'graftfx data "
                         f"{kind}' command to finish it")
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for s in index["shards"]:
        path = folder / s["file"]
        if not path.is_file():
            raise GraftError(f"{folder}: shard {s['file']} is missing; write the folder again")
        if file_sha256(path) != s["sha256"]:
            raise GraftError(f"{folder}: shard {s['file']} does not match its sha256 in {INDEX} (changed or damaged); "
                             "write the folder again")
        try:
            blob = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise GraftError(f"{folder}: shard {s['file']} does not load ({first_line(e)}); write the folder again") from None
        for n in names:
            if n not in blob or blob[n].shape[0] != s["count"]:
                raise GraftError(f"{folder}: shard {s['file']} lacks {s['count']} rows of {n!r}; write the folder again")
            parts[n].append(blob[n])
    return {n: torch.cat(v) for n, v in parts.items()}


def load_latents(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w) float32, labels (N,) int64; -1 = unlabelled) from a folder that
    ``encode_latents`` wrote, every shard checked against its sha256."""
    t = _read_shards(Path(folder), "latents", ("latents", "labels"))
    return t["latents"].float(), t["labels"].long()


def load_caption_embeddings(path) -> dict[str, torch.Tensor]:
    """{"embeddings": (N, L, D), "mask": (N, L) int64} from a folder that ``encode_captions`` wrote
    (shards checked against their sha256), or from one .safetensors file holding tensors
    ``embeddings`` and ``mask``; with the empty caption's ``null_embeddings`` (L, D) and
    ``null_mask`` (L,) when the folder (its ``null.safetensors``) or file has them."""
    path = Path(path)
    if path.is_dir():
        out = _read_shards(path, "captions", ("embeddings", "mask"))
        if (path / NULL_CAPTION).is_file():
            from safetensors.torch import load_file

            out.update(load_file(str(path / NULL_CAPTION)))
        return _checked_null(out, path)
    if not path.is_file():
        raise GraftError(f"caption embeddings {path} not found; give a folder from '{_MAKE['captions']}' or a "
                         ".safetensors file with embeddings and mask")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        blob = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise GraftError(f"caption embeddings {path} is not a readable .safetensors file ({first_line(e)}); give a "
                         "folder from 'graftfx data captions' or a .safetensors with embeddings and mask") from None
    missing = [k for k in ("embeddings", "mask") if k not in blob]
    if missing:
        raise GraftError(f"caption embeddings {path} lacks {', '.join(missing)} (it has {', '.join(list(blob)[:4])}); "
                         "it needs embeddings (N, L, D) and mask (N, L)")
    e, m = blob["embeddings"], blob["mask"]
    if not e.is_floating_point() or e.ndim != 3 or m.shape != e.shape[:2] or m.is_floating_point():
        raise GraftError(f"caption embeddings {path}: embeddings {str(e.dtype).replace('torch.', '')} "
                         f"{list(e.shape)} and mask {str(m.dtype).replace('torch.', '')} {list(m.shape)}; need float "
                         "(N, L, D) and integer/bool (N, L)")
    out = {"embeddings": e, "mask": m.long()}
    out.update({k: blob[k] for k in ("null_embeddings", "null_mask") if k in blob})
    return _checked_null(out, path)


def _checked_null(out: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """The empty caption's embedding is one row shaped like the captions' rows, with its mask."""
    if ("null_embeddings" in out) != ("null_mask" in out):
        raise GraftError(f"caption embeddings {path}: null_embeddings and null_mask come together (the empty "
                         "caption's embedding and mask); give both or neither")
    if "null_embeddings" in out:
        e, m = out["null_embeddings"], out["null_mask"]
        if tuple(e.shape) != tuple(out["embeddings"].shape[1:]) or tuple(m.shape) != tuple(out["mask"].shape[1:]):
            raise GraftError(f"caption embeddings {path}: the empty caption's embedding is {list(e.shape)} with mask "
                             f"{list(m.shape)}, a caption's is {list(out['embeddings'].shape[1:])}; encode it with "
                             "the same encoder and --max-length")
        out["null_mask"] = m.long()
    return out
