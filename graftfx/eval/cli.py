"""``graftfx eval ...``: train the digit classifier, measure a digits DiT, real FID from files."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from graftfx.errors import GraftError

from .classifier import ASSET_DIR

BUNDLED_DIT = ASSET_DIR / "dit.safetensors"


def cmd_train_classifier(args) -> int:
    from .classifier_train import train_classifier

    command = (f"graftfx eval train-classifier --out {args.out} --steps {args.steps} --batch-size {args.batch_size} "
               f"--lr {args.lr:g} --seed {args.seed}")
    r = train_classifier(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         progress=not args.quiet, command=command)
    print(f"test accuracy {r.test_accuracy:.4f} ({r.n_test} held-out images), train {r.train_accuracy:.4f}, "
          f"{r.steps} steps in {r.seconds:.1f}s")
    for name, value in r.sanity_fid.items():
        print(f"  Digits-FID {name}: {value:.3f}")
    print(f"wrote {r.files['weights']} and {r.files['card']}")
    return 0


def load_digits_dit(path=None, num_heads: int | None = None, device="cpu"):
    """A digits DiT checkpoint (default: the bundled ``graftfx/assets/digits/dit.safetensors``).

    The config comes from the file's safetensors metadata (``config``, JSON) when present; else
    it is read off the key shapes, and a checkpoint shaped like the bundled digits model gets
    ``DIGITS_CONFIG`` (its 4 heads; head counts are not visible in the weights).
    """
    from graftfx.data import DIGITS_CONFIG
    from graftfx.models import DiTConfig, load_dit
    from graftfx.models.load import infer_config, read_state_dict, stored_config

    path = Path(path) if path is not None else BUNDLED_DIT
    if not path.is_file():
        raise GraftError(f"digits DiT {path} not found: pass a checkpoint, or train the bundled one with "
                         "'graftfx pretrain digits'")
    config = stored_config(path)
    if config is None:
        config = infer_config(read_state_dict(path), f"checkpoint {path}")
        digits = DiTConfig(**DIGITS_CONFIG)
        if replace(config, num_heads=digits.num_heads, class_dropout_prob=digits.class_dropout_prob) == digits:
            config = digits
    if num_heads is not None:
        if config.hidden_size % num_heads:
            raise GraftError(f"--num-heads {num_heads} does not divide the checkpoint's width {config.hidden_size}; "
                             "pass a divisor")
        config = replace(config, num_heads=num_heads)
    return load_dit(path, config, device=device)


def _check_digits_args(args) -> None:
    """Each argument on its own, before the model is loaded (cheap checks first)."""
    from graftfx.cli import check_number, out_file
    from graftfx.limits import resolve_device
    from graftfx.models.respace import space_timesteps

    for flag, value in (("--n-per-class", args.n_per_class), ("--batch-size", args.batch_size),
                        ("--grid-rows", args.grid_rows)):
        check_number(flag, value, lo=1, integer=True)
    if args.num_heads is not None:
        check_number("--num-heads", args.num_heads, lo=1, integer=True)
    check_number("--cfg", args.cfg)
    check_number("--seed", args.seed, lo=0, hi=2**63 - 1, integer=True)
    try:
        space_timesteps(1000, args.steps)
    except (ValueError, TypeError) as e:
        raise GraftError(f"--steps {args.steps}: {e}") from None
    resolve_device(args.device)
    for flag in ("json", "grid"):
        value = getattr(args, flag)
        if value is not None:
            out_file(value, f"--{flag}")


def cmd_digits(args) -> int:
    from .evaluate import evaluate, sample_per_class
    from .grid import save_grid

    _check_digits_args(args)
    model = load_digits_dit(args.model, args.num_heads, args.device)
    classifier = None
    if args.classifier:
        from .classifier import load_classifier
        classifier = load_classifier(args.classifier, args.device)
    samples, labels = sample_per_class(model, args.n_per_class, steps=args.steps, cfg_scale=args.cfg,
                                       sampler=args.sampler, seed=args.seed, batch_size=args.batch_size,
                                       progress=not args.quiet)
    record = evaluate(samples, labels, reference=args.reference, classifier=classifier, steps=args.steps,
                      cfg_scale=args.cfg, sampler=args.sampler, seed=args.seed, progress=False)
    record.n_per_class = args.n_per_class
    print(record.summary())
    if record.per_class_accuracy:
        print("  per class: " + " ".join(f"{c}:{a:.2f}" for c, a in enumerate(record.per_class_accuracy)))
    if args.json:
        print(f"wrote {record.write_json(args.json)}")
    if args.grid:
        k = model.config.num_classes
        shown = samples[: k * min(args.grid_rows, args.n_per_class)]
        print(f"wrote {save_grid(shown, args.grid, nrow=k)}")
    return 0


def _load_sample_file(path):
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise GraftError(f"samples file {path} not found: pass an .npz holding images (arr_0 or images)")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise GraftError(f"samples file {path} is not a readable .npz ({str(e).splitlines()[0] if str(e) else e!r}); "
                         "save the images with numpy.savez") from None
    if not hasattr(data, "files"):
        raise GraftError(f"samples file {path} is a bare array, not an .npz; save the images with numpy.savez")
    with data:
        key = next((k for k in ("arr_0", "images") if k in data.files), None)
        if key is None:
            raise GraftError(f"samples file {path} has no 'arr_0' or 'images' array (has {', '.join(data.files)}); "
                             "save the images under one of those names")
        try:
            arr = data[key]
        except (ValueError, OSError, EOFError) as e:
            raise GraftError(f"samples file {path}: array {key} is unreadable ({e}); save the images again") from None
    if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[-1] in (1, 3):  # ADM layout (N, H, W, C)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and np.issubdtype(arr.dtype, np.floating):
        return torch.from_numpy(arr).float()
    raise GraftError(f"samples file {path}: array {key} is {arr.dtype} {arr.shape}; need uint8 (N, H, W, 3) or "
                     "float (N, 3, H, W) in [-1, 1]")


def cmd_inception_fid(args) -> int:
    from graftfx.cli import check_number, out_file
    from graftfx.limits import resolve_device

    from .inception import InceptionFID

    check_number("--batch-size", args.batch_size, lo=1, integer=True)
    resolve_device(args.device)
    if args.json is not None:
        out_file(args.json, "--json")

    fid = InceptionFID(args.weights, args.reference, backend=args.backend, device=args.device,
                       batch_size=args.batch_size)
    images = _load_sample_file(args.samples)
    value = fid(images)
    print(f"inception-fid {value:.3f}  (n={images.shape[0]}, reference {fid.reference_name}, {fid.extractor_name})")
    if args.json:
        import json

        from graftfx.io import atomic_write_text
        atomic_write_text(args.json, json.dumps({"fid": value, "n": int(images.shape[0]), "metric": fid.metric,
                                                 "reference": fid.reference_name,
                                                 "extractor": fid.extractor_name}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _train_args(p):
    p.add_argument("--out", metavar="DIR", required=True,
                   help="folder for classifier.safetensors and its card classifier.md (the committed ones live "
                        "in graftfx/assets/digits)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, batches, augmentation (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _steps(text: str):
    return int(text) if text.isdigit() else text


def _digits_args(p):
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="a digits DiT checkpoint (.safetensors, or .pt/.pth loaded with weights_only=True) in the "
                        "public DiT key layout (default: the bundled graftfx/assets/digits/dit.safetensors)")
    p.add_argument("--n-per-class", type=int, default=100, help="samples per class (default: %(default)s)")
    p.add_argument("--steps", type=_steps, default=250, help="sampling steps: an int, or e.g. ddim50 "
                   "(default: %(default)s)")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale, 1 = none "
                   "(default: %(default)s)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="sampler (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=500, help="images sampled at once (default: %(default)s)")
    p.add_argument("--reference", choices=("full", "train", "test"), default="full",
                   help="real digits the FID compares against (default: %(default)s, all 1,797)")
    p.add_argument("--classifier", metavar="FILE", help="classifier .safetensors (default: the committed one)")
    p.add_argument("--num-heads", type=int, help="attention heads (default: the file's config metadata, else 4 "
                   "for the digits model's shape, else width/64)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the record (numbers and sampler settings) as JSON")
    p.add_argument("--grid", metavar="PNG", help="write a grid of samples, one class per column")
    p.add_argument("--grid-rows", type=int, default=10, help="samples per class in the grid (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _inception_args(p):
    p.add_argument("samples", metavar="SAMPLES", help=".npz of images: arr_0 uint8 (N, H, W, 3) as ADM saves "
                   "them, or images float (N, 3, H, W) in [-1, 1]")
    p.add_argument("--weights", metavar="FILE", required=True,
                   help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth or "
                        "weights-inception-2015-12-05-6726825d.pth); never downloaded")
    p.add_argument("--reference", metavar="NPZ", required=True,
                   help="reference statistics .npz with mu and sigma (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--backend", choices=("auto", "torch-fidelity", "pytorch-fid"), default="auto",
                   help="FID package to run Inception with (default: %(default)s: whichever is installed)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the number with its reference and extractor as JSON")


_SUB = {
    "train-classifier": (cmd_train_classifier, _train_args, "train the digit classifier behind Digits-FID",
                         "Train the small CNN digit classifier on the fixed train split (seeded, CPU, light "
                         "augmentation), measure it on the test split, and write classifier.safetensors and its "
                         "card classifier.md to --out."),
    "digits": (cmd_digits, _digits_args, "Digits-FID and class accuracy of a digits DiT checkpoint",
               "Sample --n-per-class images of every class from MODEL with the DiT sampler and report Digits-FID "
               "(classifier features vs the real digits) and class accuracy, with the sampler settings."),
    "inception-fid": (cmd_inception_fid, _inception_args, "real FID of saved images (torch-fidelity/pytorch-fid)",
                      "FID of saved images against reference Inception statistics, through torch-fidelity or "
                      "pytorch-fid with local weights; nothing is downloaded."),
}


def register(commands: dict, arg_builders: dict) -> None:
    parsers = {}

    def cmd(args) -> int:
        if not getattr(args, "eval_command", None):   # one line naming the choices, exit 2
            parsers["eval"].error(f"no EVAL_COMMAND given; choose one of {', '.join(_SUB)}")
        return _SUB[args.eval_command][0](args)

    def build(p: argparse.ArgumentParser):
        parsers["eval"] = p
        sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
        for name, (_fn, add_args, help_text, description) in _SUB.items():
            add_args(sub.add_parser(name, help=help_text, description=description))

    commands["eval"] = (cmd, "evaluate: Digits-FID, class accuracy, real FID; train the digit classifier",
                        "Measure generated samples: Digits-FID and class accuracy of a digits DiT (through the "
                        "committed digit classifier), real Inception FID from local files, and training of that "
                        "classifier. Run 'graftfx eval EVAL_COMMAND --help' for each.")
    arg_builders["eval"] = build
