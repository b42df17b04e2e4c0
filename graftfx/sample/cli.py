"""``graftfx sample``: generate images from a grafted transformer (or a base model) inside its
diffusers pipeline, write PNGs, a grid and the settings, and optionally real FID."""
from __future__ import annotations

import argparse

from graftfx.errors import GraftError


def _labels(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of class ids") from None


def _check(args) -> None:
    """Every argument on its own, before anything is loaded (cheap checks first)."""
    from pathlib import Path

    from graftfx.cli import check_number, out_folder
    from graftfx.limits import resolve_device

    out_folder(args.out)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        check_number(flag, value, lo=1, integer=True)
    if args.n is not None:
        check_number("--n", args.n, lo=1, integer=True)
    check_number("--seed", args.seed, lo=0, hi=2**63 - 1, integer=True)
    if args.guidance is not None:
        check_number("--guidance", args.guidance, lo=0)
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None:
            check_number(f"--{flag}", value, lo=8, integer=True)
            if value % 8:
                raise GraftError(f"--{flag} {value}: must be a multiple of 8")
    resolve_device(args.device)
    if (args.pipeline is None) == (args.model is None):
        raise GraftError("give one of --pipeline FOLDER (a diffusers pipeline) or --model MODEL (a graftfx DiT: "
                         "digits or a checkpoint)")
    for flag, value in (("--pipeline", args.pipeline), ("--grafted", args.grafted), ("--vae", args.vae)):
        if value is not None and not Path(value).is_dir():
            raise GraftError(f"{flag} {value}: no such folder")
    for flag, value in (("--embeddings", args.embeddings), ("--negative", args.negative)):
        if value is not None and not Path(value).exists():
            raise GraftError(f"{flag} {value} not found; give a .safetensors with embeddings and mask "
                             "(graftfx data captions writes one)")
    if (args.fid_ref is None) != (args.inception_weights is None):
        missing = "--inception-weights FILE (local FID Inception weights, never downloaded)" \
            if args.inception_weights is None else "--fid-ref STATS.npz (mu and sigma of the real images)"
        raise GraftError(f"real FID needs both --fid-ref and --inception-weights: missing {missing}")


def cmd_sample(args) -> int:
    import json

    from graftfx.io import atomic_write_text

    from .sample import load_embeddings, write_images

    _check(args)
    fid = None
    if args.fid_ref is not None:                    # everything FID needs, before any sampling
        from graftfx.eval.inception import InceptionFID

        fid = InceptionFID(args.inception_weights, args.fid_ref, backend=args.fid_backend, device=args.device)
    embeddings = load_embeddings(args.embeddings) if args.embeddings else None
    negative = load_embeddings(args.negative) if args.negative else None
    if args.model is not None:
        images, settings = _native(args)
    else:
        images, settings = _diffusers(args, embeddings, negative)
    files = write_images(images, args.out, grid_nrow=args.grid_nrow)
    record = {**settings, "n": int(images.shape[0]), "size": list(images.shape[2:]),
              "grafted": str(args.grafted) if args.grafted else None,
              "source": str(args.pipeline if args.pipeline is not None else args.model)}
    if fid is not None:
        record.update(fid=fid(images), fid_reference=fid.reference_name, fid_extractor=fid.extractor_name)
        print(f"inception-fid {record['fid']:.3f}  (n={images.shape[0]}, reference {fid.reference_name})")
    atomic_write_text(f"{args.out}/samples.json", json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {len(files['images'])} images, {files['grid']} and samples.json to {args.out}")
    return 0


def _native(args):
    from .sample import load_native, load_vae, sample_native

    if args.embeddings or args.negative or args.prompt or args.height or args.width:
        raise GraftError("a graftfx DiT takes class labels (--labels), not prompts, embeddings or a size")
    model, config = load_native(args.model, grafted=args.grafted, device=args.device)
    vae = load_vae(args.vae, args.device) if args.vae else None
    return sample_native(model, config, labels=args.labels, n=args.n, steps=args.steps, seed=args.seed,
                         guidance=args.guidance, sampler=args.sampler, batch_size=args.batch_size, vae=vae,
                         progress=not args.quiet)


def _diffusers(args, embeddings, negative):
    import torch

    from .sample import load_pipeline, sample_images

    dtype = getattr(torch, args.dtype) if args.dtype else None
    pipe = load_pipeline(args.pipeline, grafted=args.grafted, device=args.device, dtype=dtype,
                         text_encoder=not (embeddings is not None and not args.prompt),
                         check_hash=not args.no_check_hash)
    return sample_images(pipe, n=args.n, labels=args.labels, embeddings=embeddings, negative=negative,
                         prompts=args.prompt, steps=args.steps, seed=args.seed, guidance=args.guidance,
                         height=args.height, width=args.width, batch_size=args.batch_size, progress=not args.quiet)


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", metavar="FOLDER",
                   help="local diffusers pipeline folder (model_index.json, vae, scheduler, text encoder, ...)")
    p.add_argument("--model", metavar="MODEL", help="instead of --pipeline: a graftfx DiT ('digits', the bundled "
                   "model, or a DiT checkpoint), sampled with graftfx's own DiT sampler")
    p.add_argument("--grafted", metavar="FOLDER", help="with --pipeline: a grafted transformer folder "
                   "(GraftedTransformer.save_pretrained) in place of the pipeline's transformer; with --model: a "
                   "graftfx export folder (graft.json + model.safetensors) of that model (default: the base model)")
    p.add_argument("--vae", metavar="FOLDER", help="with --model: an AutoencoderKL folder to decode 4-channel latents")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="with --model: the DiT sampler "
                   "(default: %(default)s)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for 000000.png ..., grid.png, samples.json")
    p.add_argument("--n", type=int, help="number of images (default: one per label / embedding row / prompt)")
    p.add_argument("--labels", type=_labels, help="DiT: comma-separated class ids (default: 0, 1, ... cycling)")
    p.add_argument("--embeddings", metavar="FILE", help="PixArt: prompt embeddings, a .safetensors with embeddings "
                   "(N, L, D) and mask (N, L) (or a graftfx data captions folder)")
    p.add_argument("--negative", metavar="FILE", help="PixArt: negative prompt embeddings for guidance, same format")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="PixArt: a text prompt (repeatable; needs the "
                   "pipeline's text encoder)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default: %(default)s)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, 1 = none (default: the "
                   "pipeline's: DiTPipeline 4, PixArt 4.5; graftfx DiT 1.5)")
    p.add_argument("--height", type=int, help="PixArt: image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="PixArt: image width in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default: %(default)s)")
    p.add_argument("--grid-nrow", type=int, help="images per grid row (default: about the square root)")
    p.add_argument("--fid-ref", metavar="NPZ", help="reference statistics (.npz with mu, sigma) for real FID")
    p.add_argument("--inception-weights", metavar="FILE", help="local FID Inception weights for real FID")
    p.add_argument("--fid-backend", choices=("auto", "torch-fidelity", "pytorch-fid"), default="auto",
                   help="FID package (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="run the pipeline in this dtype")
    p.add_argument("--no-check-hash", action="store_true", help="load the graft onto a pipeline transformer that "
                   "differs from the base it was grafted onto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(commands: dict, arg_builders: dict) -> None:
    commands["sample"] = (cmd_sample, "images from a grafted transformer inside its diffusers pipeline",
                          "Load a local diffusers pipeline (DiT or PixArt), put the grafted transformer of --grafted "
                          "in place of its own, and generate images: class labels with guidance for DiT, prompt "
                          "embeddings (or prompts, with a text encoder) for PixArt; or sample a graftfx DiT "
                          "(--model, grafted from an export folder with --grafted). Writes one PNG per image, "
                          "grid.png and samples.json (the settings); with --fid-ref and --inception-weights, real FID.")
    arg_builders["sample"] = _sample_args
