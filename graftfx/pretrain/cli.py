"""``graftfx pretrain digits``: train the bundled digits DiT (registered by ``graftfx.cli``)."""
from __future__ import annotations

import shlex

from .train import TrainSettings

_D = TrainSettings()

DESCRIPTION = (
    "Train DiT(DiTConfig(**DIGITS_CONFIG)) (8x8 digits, patch 1, 8 blocks, width 128, 4 heads, learned sigma) "
    "from scratch on the train split of scikit-learn's digits with the DiT diffusion loss (1000 steps, linear "
    "betas, eps-MSE + VB), label dropout 0.1 for classifier-free guidance, AdamW with linear warm-up then a "
    "constant learning rate, gradient clipping and an EMA of the weights. Writes metrics.jsonl, checkpoints/ "
    "(safetensors, atomically), and at the end dit.safetensors (EMA weights, public DiT key layout), "
    "dit-samples.png (10 classes x 10 DDPM samples) and the model card dit.md into --out. The same seed gives "
    "the same weights on the CPU (with the same --threads); --resume continues bit for bit. A NaN loss stops "
    "the run with an error and keeps the last good checkpoint.")


def cmd_pretrain(args) -> int:
    import torch

    from .train import resolve_settings, train_digits

    if args.threads is not None:
        if args.threads < 1:
            from graftfx.errors import GraftError

            raise GraftError(f"--threads must be >= 1, got {args.threads}; fix: pass e.g. --threads 1")
        torch.set_num_threads(args.threads)
    given = dict(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                 ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed, ckpt_every=args.ckpt_every,
                 log_every=args.log_every, keep=args.keep, sample_steps=args.sample_steps, cfg_scale=args.cfg_scale)
    settings = resolve_settings(args.out, given, args.resume)
    command = _command_line(args, given)
    result = train_digits(args.out, settings, resume=args.resume, progress=not args.no_progress, command=command)
    print(f"trained to step {result.step} in {result.wall_s / 60:.1f} min; final loss {result.final_loss}, "
          f"held-out loss (EMA) {result.eval_loss}")
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    return 0


def build_args(p) -> None:
    p.add_argument("dataset", choices=["digits"], help="what to pretrain on: 'digits' (scikit-learn's 8x8 digits; "
                   "the only one so far)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="run folder: metrics.jsonl, checkpoints/, and at the end dit.safetensors, dit.md, "
                        "dit-samples.png")
    p.add_argument("--steps", type=int, metavar="N",
                   help=f"total optimizer steps (with --resume: the new total to reach; default {_D.steps})")
    p.add_argument("--batch", type=int, metavar="B", help=f"images per step (default {_D.batch})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate after warm-up (default {_D.lr:g})")
    p.add_argument("--warmup", type=int, metavar="N",
                   help=f"steps of linear learning-rate warm-up from 0 (default {_D.warmup})")
    p.add_argument("--weight-decay", type=float, metavar="W", help=f"AdamW weight decay (default {_D.weight_decay:g})")
    p.add_argument("--ema-decay", type=float, metavar="D",
                   help=f"EMA decay of the weights, ramped in as (1+step)/(10+step) (default {_D.ema_decay})")
    p.add_argument("--grad-clip", type=float, metavar="C",
                   help=f"clip the gradient norm to C (default {_D.grad_clip:g})")
    p.add_argument("--seed", type=int, help=f"seed of the init, batches, timesteps, noise, label dropout and the "
                   f"sample grid (default {_D.seed})")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out; flags left out keep the checkpoint's values, "
                        "and --batch/--lr/--warmup/--weight-decay/--ema-decay/--grad-clip/--seed must match it")
    p.add_argument("--ckpt-every", type=int, metavar="N",
                   help="write a checkpoint (and the held-out loss) every N steps and at the end "
                        f"(default {_D.ckpt_every})")
    p.add_argument("--log-every", type=int, metavar="N",
                   help=f"append mean loss, grad norm and lr to metrics.jsonl every N steps (default {_D.log_every})")
    p.add_argument("--keep", type=int, metavar="K", help=f"checkpoints kept on disk, newest first (default {_D.keep})")
    p.add_argument("--sample-steps", type=int, metavar="N",
                   help=f"respaced DDPM steps for the sample grid (default {_D.sample_steps})")
    p.add_argument("--cfg-scale", type=float, metavar="S",
                   help=f"classifier-free guidance scale for the sample grid (default {_D.cfg_scale:g})")
    p.add_argument("--threads", type=int, metavar="T",
                   help="torch CPU threads (default: torch's choice); bit-exact reruns need the same value")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _command_line(args, given: dict) -> str:
    """The command as typed, rebuilt from the parsed flags (for the model card)."""
    words = ["graftfx", "pretrain", args.dataset, "--out", str(args.out)]
    for name, value in given.items():
        if value is not None:
            words += [f"--{name.replace('_', '-')}", str(value)]
    if args.threads is not None:
        words += ["--threads", str(args.threads)]
    if args.resume:
        words.append("--resume")
    return shlex.join(words)


def register(commands: dict, arg_builders: dict) -> None:
    commands["pretrain"] = (cmd_pretrain, "train graftfx's bundled DiT from scratch (digits)", DESCRIPTION)
    arg_builders["pretrain"] = build_args
