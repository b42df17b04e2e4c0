"""``graftfx data ...``: prepare distillation data for diffusers models: images -> VAE latents,
captions -> text-encoder embeddings (sharded, resumable folders; see ``graftfx.data.encode``)."""
from __future__ import annotations

import argparse

from graftfx.errors import GraftError


def _check_common(args) -> None:
    from graftfx.cli import check_number, out_folder
    from graftfx.limits import resolve_device

    for flag in ("batch_size", "shard_size"):
        check_number("--" + flag.replace("_", "-"), getattr(args, flag), lo=1, integer=True)
    out_folder(args.out)
    resolve_device(args.device)


def cmd_latents(args) -> int:
    from graftfx.cli import check_number

    from .encode import encode_latents, read_index

    _check_common(args)
    if args.size is not None:
        check_number("--size", args.size, lo=1, integer=True)
    if args.scale is not None:
        check_number("--scale", args.scale, lo=0, low_open=True)
    check_number("--workers", args.workers, lo=1, integer=True)
    out = encode_latents(args.images, args.vae, args.out, size=args.size, scale=args.scale, batch_size=args.batch_size,
                         shard_size=args.shard_size, labels=args.labels, device=args.device, workers=args.workers,
                         progress=not args.quiet)
    index = read_index(out, "latents")
    s = index["settings"]
    classes = s["classes"]
    labelled = f"{len(classes)} classes ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''})" \
        if classes else "no labels (-1)"
    print(f"wrote {index['count']} latents {tuple(s['latent_shape'])} (size {s['size']}, scale {s['scale']:g}), "
          f"{labelled}, in {len(index['shards'])} shards to {out}")
    return 0


def cmd_captions(args) -> int:
    from graftfx.cli import check_number

    from .encode import encode_captions, read_index

    _check_common(args)
    if args.max_length is not None:
        check_number("--max-length", args.max_length, lo=1, integer=True)
    if args.pipeline is None and (args.text_encoder is None or args.tokenizer is None):
        raise GraftError("no text encoder given: pass --pipeline FOLDER, or both --text-encoder and --tokenizer")
    out = encode_captions(args.captions, args.out, pipeline=args.pipeline, text_encoder=args.text_encoder,
                          tokenizer=args.tokenizer, max_length=args.max_length, batch_size=args.batch_size,
                          shard_size=args.shard_size, dtype=args.dtype, encoder_dtype=args.encoder_dtype,
                          device=args.device, progress=not args.quiet)
    index = read_index(out, "captions")
    s = index["settings"]
    print(f"wrote {index['count']} caption embeddings (max length {s['max_length']}, {s['dtype']}) in "
          f"{len(index['shards'])} shards to {out}")
    return 0


def _common_args(p, batch: int, shard: int) -> None:
    p.add_argument("--out", metavar="DIR", required=True,
                   help="output folder: index.json plus shard-NNNNN.safetensors; rerunning the same command "
                        "continues an interrupted run, other settings are refused")
    p.add_argument("--batch-size", type=int, default=batch, metavar="N", help="items encoded at once (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=shard, metavar="N", help="items per shard file (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device the encoder runs on (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _latents_args(p) -> None:
    p.add_argument("images", metavar="IMAGES",
                   help="folder of .png/.jpg images, read recursively in sorted path order; ImageNet-style "
                        "class sub-folders (IMAGES/<class>/...) give integer labels in sorted folder order")
    p.add_argument("--vae", metavar="FOLDER", required=True,
                   help="local diffusers AutoencoderKL folder (config.json + weights), or a pipeline folder "
                        "holding vae/; nothing is downloaded")
    _common_args(p, 32, 1024)
    p.add_argument("--size", type=int, metavar="N", help="image side after resize + centre crop (default: the VAE's "
                   "config.sample_size); a multiple of the VAE's downsampling factor")
    p.add_argument("--scale", type=float, metavar="S", help="latent scale (default: the VAE's config.scaling_factor; DiT's "
                   "checkpoints use 0.18215)")
    p.add_argument("--workers", type=int, default=4, metavar="N",
                   help="threads decoding and resizing images, at most 8 (default: %(default)s)")
    p.add_argument("--labels", choices=("auto", "folders", "none"), default="auto",
                   help="class labels from sub-folders: folders (required), none (all -1), auto (folders when "
                        "every image is in one; default)")


def _captions_args(p) -> None:
    p.add_argument("captions", metavar="FILE",
                   help="captions: .txt (one per line, blank lines skipped), .json list, or .jsonl (strings, or "
                        "objects with a caption/text/prompt string)")
    p.add_argument("--pipeline", metavar="FOLDER",
                   help="local diffusers pipeline folder whose text_encoder/ and tokenizer/ encode the captions")
    p.add_argument("--text-encoder", metavar="FOLDER", help="text encoder folder (transformers; T5 configs load as "
                   "T5EncoderModel), instead of the pipeline's")
    p.add_argument("--tokenizer", metavar="FOLDER", help="tokenizer folder, instead of the pipeline's")
    _common_args(p, 16, 256)
    p.add_argument("--max-length", type=int, metavar="N", help="tokens per caption, padded and truncated (default: 300 for "
                   "PixArt-Sigma pipelines, 120 for PixArt-alpha, else the tokenizer's model_max_length capped "
                   "at 300)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="stored embedding dtype (default: %(default)s)")
    p.add_argument("--encoder-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the text encoder runs in (default: %(default)s)")


_SUB = {
    "latents": (cmd_latents, _latents_args, "encode a folder of images into VAE latents",
                "Resize and centre-crop every image under IMAGES, encode it with a local diffusers AutoencoderKL "
                "(the posterior mean times the scale) and write sharded latents and labels to --out, the data "
                "'graftfx distill' trains DiT-style models on. Resumable: rerun the same command after an "
                "interruption."),
    "captions": (cmd_captions, _captions_args, "encode captions into text-encoder embeddings and masks",
                 "Tokenize every caption (padded to --max-length) and run it through a local pipeline's text "
                 "encoder; write sharded embeddings (N, L, D) and attention masks (N, L) to --out, the conditioning "
                 "of text-to-image models such as PixArt. Resumable: rerun the same command after an interruption."),
}


def register(commands: dict, arg_builders: dict) -> None:
    parsers = {}

    def cmd(args) -> int:
        if not getattr(args, "data_command", None):   # one line naming the choices, exit 2
            parsers["data"].error(f"no DATA_COMMAND given; choose one of {', '.join(_SUB)}")
        return _SUB[args.data_command][0](args)

    def build(p: argparse.ArgumentParser):
        parsers["data"] = p
        sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
        for name, (_fn, add_args, help_text, description) in _SUB.items():
            add_args(sub.add_parser(name, help=help_text, description=description))

    commands["data"] = (cmd, "prepare data: images -> VAE latents, captions -> text embeddings",
                        "Prepare distillation data for diffusers models from local files: encode a folder of "
                        "images into latents with a VAE, or captions into embeddings with a pipeline's text "
                        "encoder. Run 'graftfx data DATA_COMMAND --help' for each.")
    arg_builders["data"] = build
