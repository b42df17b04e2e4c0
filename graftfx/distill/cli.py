"""``graftfx distill`` and ``graftfx export``."""
from __future__ import annotations

import argparse

from graftfx.errors import GraftError


def _check_distill_args(args) -> None:
    """Every argument on its own, before anything is read or built (cheap checks first)."""
    from graftfx.cli import check_number, out_folder
    from graftfx.limits import resolve_device

    out_folder(args.out)
    if args.cache is not None:
        out_folder(args.cache, "--cache")
    for flag, value in (("--samples", args.samples), ("--shard-size", args.shard_size), ("--steps1", args.steps1),
                        ("--batch1", args.batch1), ("--steps2", args.steps2), ("--batch2", args.batch2),
                        ("--ckpt-every", args.ckpt_every), ("--log-every", args.log_every)):
        check_number(flag, value, lo=1, integer=True)
    for flag, value in (("--warmup1", args.warmup1), ("--warmup2", args.warmup2)):
        check_number(flag, value, lo=0, integer=True)
    check_number("--seed", args.seed, lo=0, hi=2**63 - 1, integer=True)
    for flag, value in (("--lr1", args.lr1), ("--lr1-mlp", args.lr1_mlp), ("--lr2", args.lr2)):
        check_number(flag, value, lo=0, low_open=True)
    check_number("--ema", args.ema, lo=0, hi=0.999999999)
    resolve_device(args.device)


def _distill(args) -> int:
    from graftfx.models.zoo import resolve_model
    from graftfx.rules import load_rules

    from .pipeline import DistillSettings, run_distill
    from .stage1 import Stage1Config
    from .stage2 import Stage2Config

    _check_distill_args(args)
    try:
        s1 = Stage1Config(steps=args.steps1, batch_size=args.batch1, lr=args.lr1, lr_mlp=args.lr1_mlp,
                          schedule=args.schedule, warmup=args.warmup1, seed=args.seed, ckpt_every=args.ckpt_every,
                          log_every=args.log_every)
        s2 = Stage2Config(steps=args.steps2, batch_size=args.batch2, lr=args.lr2, warmup=args.warmup2,
                          train=args.train, objective=args.objective, ema_decay=args.ema, seed=args.seed,
                          parallel=args.parallel, fsdp_precision=args.fsdp_precision,
                          activation_checkpointing=args.activation_checkpointing,
                          ckpt_every=args.ckpt_every, log_every=args.log_every)
    except ValueError as e:
        raise GraftError(str(e)) from None
    settings = DistillSettings(stage=args.stage, cache=args.cache, online=args.online, samples=args.samples,
                               cache_dtype=args.cache_dtype, shard_size=args.shard_size, stage1=s1, stage2=s2,
                               device=args.device)
    rules = load_rules(args.rules)                   # cheap checks first: the rule file, the data file
    if args.loss:
        for r in rules:
            r.loss = args.loss
    if args.plan:
        return _plan(args, rules, settings)
    data = _data(args)
    model, ex_args, ex_kwargs = resolve_model(args.model, meta=False, batch=2, seed=args.seed)
    if ex_kwargs or args.inputs:   # a keyword model: traced as its pipeline calls it, fed through its adapter
        from graftfx.models.adapters import adapter_for

        if args.inputs:
            _, ex_kwargs = data["ready"].call(range(2))
            ex_args = ()
        else:
            adapter = adapter_for(model)
            sizes = {"text_length": int(data["conditioning"]["embeddings"].shape[1])} if "conditioning" in data else {}
            ex_args, ex_kwargs = adapter.example(model, 2, shape=tuple(data["latents"].shape[1:]), **sizes)
    run_distill(model, ex_args, rules, data.pop("latents"), data.pop("labels"), args.out, settings,
                example_kwargs=ex_kwargs, model_id=args.model, resume=args.resume, progress=not args.no_progress,
                **data)
    return 0


def _plan(args, rules, settings) -> int:
    """``--plan``: trace (on the meta device where the model allows), select, splice, and print the
    estimate; nothing is recorded, trained or written."""
    import os

    from graftfx.models.zoo import resolve_model

    from .pipeline import plan_distill

    world = args.world or int(os.environ.get("WORLD_SIZE", "1"))
    from graftfx.cli import check_number

    check_number("--world", world, lo=1, integer=True)
    model, ex_args, ex_kwargs = resolve_model(args.model, meta=True, batch=2, seed=args.seed)
    if ex_kwargs:
        from graftfx.models.adapters import adapter_for

        ex_args, ex_kwargs = adapter_for(model).example(model, 2)
    from graftfx.rules import load_rules

    print(plan_distill(model, ex_args, ex_kwargs, load_rules(rules), settings, world, model_id=args.model)["text"])
    return 0


def _data(args) -> dict:
    """Latents, labels and the rest of what distill_plan takes, from --data/--captions/--scheduler/--inputs."""
    from graftfx.models.adapters import NoiseSchedule, ReadyInputs

    from .pipeline import load_data

    if args.inputs:
        ready = ReadyInputs(args.inputs, fixed={"return_dict": False})
        return {"latents": None, "labels": None, "ready": ready}
    captions = None
    if args.captions:
        from graftfx.data.encode import load_caption_embeddings

        captions = load_caption_embeddings(args.captions)
    latents, labels = load_data(args.data, labels=captions is None)
    out = {"latents": latents, "labels": labels}
    if captions is not None:
        out["conditioning"] = {"embeddings": captions["embeddings"].float(), "mask": captions["mask"]}
        if "null_embeddings" in captions:   # the empty caption: stage 2's unconditional input
            out["unconditional"] = {"embeddings": captions["null_embeddings"].float(), "mask": captions["null_mask"]}
    if args.scheduler:
        out["schedule"] = NoiseSchedule.from_folder(args.scheduler)
    return out


def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("rules", metavar="RULES.toml", help="rule file (path or bundled name)")
    p.add_argument("--model", required=True, help="teacher: a DiT preset (random weights), a checkpoint, 'digits' "
                                                  "(the bundled pretrained model), or a diffusers transformer "
                                                  "(diffusers:dit / pixart / FOLDER)")
    p.add_argument("--data", default="digits", help="'digits' (bundled), a .safetensors/.pt file with tensors "
                                                    "'latents' (N, C, H, W) and 'labels' (N,), or a latents folder "
                                                    "written by 'graftfx data latents' (default: digits)")
    p.add_argument("--captions", metavar="FILE", help="text-conditioned models (PixArt): caption embeddings + masks "
                                                      "written by 'graftfx data captions', one row per latent")
    p.add_argument("--scheduler", metavar="FOLDER", help="the noise schedule and prediction type (epsilon, "
                                                         "v_prediction, flow matching) from a diffusers pipeline or "
                                                         "scheduler folder (default: DDPM linear, 1000 steps, epsilon)")
    p.add_argument("--inputs", metavar="FILE", help="ready calibration inputs instead of --data: a safetensors file "
                                                    "of tensors named as the model's forward keywords, one row per "
                                                    "sample (stage 1 only)")
    p.add_argument("--out", required=True, help="output folder: cache/, stage1/, stage2/, grafted/ (export)")
    p.add_argument("--stage", choices=["1", "2", "both"], default="both", help="which stages to run (default: both)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--cache", metavar="DIR", help="teacher activation cache folder (default: OUT/cache); an "
                                                    "interrupted write continues on rerun. Under torchrun each rank "
                                                    "records only its regions into DIR/rankR-of-W and reuses any "
                                                    "matching folder it finds under DIR; DIR may be node-local "
                                                    "('{rank}' in it becomes the rank)")
    src.add_argument("--online", action="store_true", help="compute teacher activations on the fly (no disk)")
    p.add_argument("--resume", action="store_true", help="continue stage 1/2 from the last checkpoint in --out "
                                                         "(automatic in a run torchrun --max-restarts restarted)")
    p.add_argument("--plan", action="store_true", help="print what the run will spend (each rank's regions, cache "
                                                       "bytes, peak host/device memory, teacher FLOPs) and stop")
    p.add_argument("--world", type=int, help="with --plan: the world size to plan for (default: WORLD_SIZE or 1)")
    g = p.add_argument_group("teacher activations")
    g.add_argument("--samples", type=int, default=1024, help="calibration samples: noised data at t~U{0..999} "
                                                             "(paper: 8000; default %(default)s)")
    g.add_argument("--cache-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="storage dtype of the cache (paper: float16)")
    g.add_argument("--shard-size", type=int, default=256, help="samples per cache shard (default %(default)s)")
    g = p.add_argument_group("stage 1 (activation distillation)")
    g.add_argument("--steps1", type=int, default=500, help="steps (default %(default)s)")
    g.add_argument("--batch1", type=int, default=8, help="batch size (paper: 8)")
    g.add_argument("--lr1", type=float, default=5e-4, help="lr for attention replacements (paper: 5e-4)")
    g.add_argument("--lr1-mlp", type=float, default=1e-3, help="lr for MLP replacements (paper: 1e-3)")
    g.add_argument("--schedule", choices=["constant", "cosine"], default="constant", help="lr schedule (paper: constant)")
    g.add_argument("--warmup1", type=int, default=0, help="warmup steps")
    g.add_argument("--loss", choices=["l1", "l2", "huber"], help="override every rule's loss (default: L1 for "
                                                                  "attention replacements, L2 for MLPs)")
    g = p.add_argument_group("stage 2 (finetuning)")
    g.add_argument("--steps2", type=int, default=200, help="steps (default %(default)s)")
    g.add_argument("--batch2", type=int, default=32, help="batch size (paper: 256)")
    g.add_argument("--lr2", type=float, default=1e-4, help="lr (paper: 1e-4)")
    g.add_argument("--warmup2", type=int, default=20, help="warmup steps (paper: 4000)")
    g.add_argument("--train", choices=["all", "spliced"], default="all", help="which parameters train (paper: all)")
    g.add_argument("--objective", choices=["diffusion", "distill", "both"], default="diffusion",
                   help="DiT loss on data, output distillation against the teacher, or both")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay (paper: 0.9999 over long runs)")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: DDP, or FSDP2 (each block one fully_shard unit; every rank checkpoints "
                        "its own shards) for models that do not fit one device")
    g.add_argument("--fsdp-precision", choices=["bf16", "fp32"], default="bf16",
                   help="FSDP: bf16 parameters in forward/backward with fp32 gradient reduction and fp32 master "
                        "weights, or fp32 throughout (default %(default)s)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block's activations in backward instead of keeping them "
                        "(default: on under --parallel fsdp, off otherwise)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed for calibration, batches and init")
    g.add_argument("--device", default="cuda" if _cuda() else "cpu", help="device (default: %(default)s)")
    g.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10, help="metrics every N steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _export(args) -> int:
    from graftfx.cli import out_folder
    from graftfx.export.export import export_grafted, fingerprint, preflight, read_manifest
    from graftfx.models.load import read_state_dict
    from graftfx.models.zoo import resolve_model
    from graftfx.rules import load_rules
    from graftfx.select.select import select
    from graftfx.splice.splice import splice
    from graftfx.state import check_state, dtypes_of, shapes_of
    from graftfx.trace.tracer import trace
    from graftfx.training import checkpoint_file

    out_folder(args.out)
    rules = load_rules(args.rules)                     # cheap checks first: the rules, the weights file
    weights = checkpoint_file(args.weights) if args.weights else None
    state = read_state_dict(weights, what=f"--weights {args.weights}") if weights is not None else None
    model, ex_args, ex_kwargs = resolve_model(args.model, meta=False, batch=2)
    plan = select(trace(model, ex_args, ex_kwargs), rules)
    preflight(plan)
    grafted = splice(plan)
    if state is not None:
        own = grafted.state_dict()
        given = shapes_of(state)
        if not set(given) & set(own):
            raise GraftError(f"--weights {args.weights} holds none of this grafted model's {len(own)} keys (it has "
                             f"{', '.join(list(given)[:3])}...); give the weights trained for these rules and model")
        optional = set(own) - set(given) if args.partial else set()
        check_state(shapes_of(own), given, what=f"--weights {args.weights}", optional=optional,
                    own_dtypes=dtypes_of(own), saved_dtypes=dtypes_of(state),
                    fix="give the weights of this model and rules" + ("" if args.partial else
                        ", or --partial to keep the keys the file lacks as they are"))
        from graftfx.state import detach_from

        detach_from(grafted, model)                    # the base keeps its own weights
        grafted.load_state_dict({**grafted.state_dict(), **state}, strict=True)
    path = export_grafted(grafted, args.out, base_id=args.model, base_hash=fingerprint(model))
    manifest = read_manifest(path)
    print(f"exported {len(manifest['regions'])} grafted regions to {path}/ (model.safetensors, graft.json)")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("rules", metavar="RULES.toml", help="rule file (path or bundled name)")
    p.add_argument("--model", required=True, help="base model: preset, checkpoint, or 'digits'")
    p.add_argument("--weights", help="trained weights to put in: a .safetensors file, or a run's checkpoint folder "
                                     "(e.g. OUT/stage1/checkpoint: its newest complete checkpoint's params)")
    p.add_argument("--partial", action="store_true", help="allow --weights to cover only some keys (spliced params)")
    p.add_argument("--out", required=True, help="folder for model.safetensors + graft.json")


def register(commands: dict, arg_builders: dict) -> None:
    commands["distill"] = (_distill, "cache teacher activations, stage 1 distillation, stage 2 finetuning, export",
                           "Graft MODEL with RULES, record the teacher's region inputs/outputs on noised data "
                           "(a safetensors cache, or --online), train only the spliced operators to reproduce "
                           "them (stage 1), optionally finetune the grafted model end to end (stage 2), and export "
                           "OUT/grafted (model.safetensors + graft.json). Runs under torchrun: stage 1 shards "
                           "regions across ranks, stage 2 uses DDP.")
    arg_builders["distill"] = _distill_args
    commands["export"] = (_export, "write a grafted model as safetensors + graft manifest",
                          "Graft MODEL with RULES, optionally load trained weights, and write model.safetensors "
                          "and graft.json; graftfx.load_grafted(base_model, OUT) rebuilds it.")
    arg_builders["export"] = _export_args
