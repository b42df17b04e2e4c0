"""Stage 2, lightweight finetuning of the grafted model end to end.

Objectives: the DiT diffusion loss on real data (latents + labels), output distillation
against the teacher (MSE of the full model output on the same noised inputs), or both.
Trains all parameters (the paper) or only the spliced ones; AdamW with warmup; EMA of the
trained weights; bf16 autocast on CUDA; DDP (or FSDP) when run under torchrun.

``batch_size`` is the global batch: every rank draws the same batch (indices, label dropout,
timesteps, noise) from the same seed and trains on its 1/world slice, so DDP and FSDP follow the
single-process run on that batch (up to the order of floating-point sums).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.models.diffusion import GaussianDiffusion
from graftfx.training import CheckpointStore, Metrics, lr_lambda, plot_curves, restore_rng, rng_state, run_steps

OBJECTIVES = ("diffusion", "distill", "both")


@dataclass
class Stage2Config:
    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 50            # the paper: 4k of tens of thousands of steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999    # the paper: 0.9999 over far longer runs
    train: str = "all"          # "all" (the paper) or "spliced"
    objective: str = "diffusion"
    distill_weight: float = 1.0
    parallel: str = "ddp"       # under torchrun: "ddp", or "fsdp" (FSDP2 fully_shard) for models that do not fit
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    num_classes: int = 1000     # the null class index for dropped labels
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    autocast: bool = True

    def __post_init__(self):
        if self.train not in ("all", "spliced"):
            raise ValueError(f"stage 2 train must be all or spliced, got {self.train!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"stage 2 parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"stage 2 objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage 2 {name} must be >= 1, got {getattr(self, name)}")


def unshare(grafted: nn.Module, teacher: nn.Module) -> None:
    """Give ``grafted`` its own copies of the modules and tensors it shares with ``teacher``
    (splicing shares untouched modules), so training all parameters never changes the teacher."""
    modules = {id(m) for m in teacher.modules()}

    def copy_shared(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if id(child) in modules:
                setattr(parent, name, copy.deepcopy(child))
            else:
                copy_shared(child)

    copy_shared(grafted)
    theirs = {id(p) for p in teacher.parameters()} | {id(b) for b in teacher.buffers()}
    for module in grafted.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in theirs:
                setattr(module, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if id(b) in theirs:
                module.register_buffer(name, b.detach().clone(), persistent=name not in module._non_persistent_buffers_set)


_LEGACY = ("model.safetensors", "ema.safetensors", "optim.pt", "state.json")


def checkpoint_root(out_dir) -> Path:
    """Where stage 2 keeps its step checkpoints (written by rank 0): ``OUT/checkpoint``."""
    return Path(out_dir) / "checkpoint"


def has_checkpoint(out_dir) -> bool:
    """Whether ``out_dir`` holds a complete stage 2 checkpoint (a ``--stage both --resume`` of a
    run stopped before stage 2 began starts stage 2 afresh instead of failing)."""
    return CheckpointStore(checkpoint_root(out_dir)).latest() is not None


def train_stage2(grafted, teacher, latents: torch.Tensor, labels: torch.Tensor | None, cfg: Stage2Config, out_dir, *,
                 resume: bool = False, rank: int = 0, world: int = 1, device=None, progress: bool = True,
                 adapter=None, base=None, conditioning: dict | None = None, schedule=None) -> dict:
    """Finetune ``grafted`` (in place). Returns {"loss": last loss, "ema": {name: tensor}, "steps": n,
    "checkpoint": the newest step folder}.

    Rank 0 writes the checkpoints: ``step-N/model.safetensors`` (the whole model),
    ``step-N/ema.safetensors`` (EMA of the trained parameters), ``step-N/train.safetensors``
    (optimizer, scheduler, sampler and RNG state; not under FSDP, whose runs do not resume) and
    ``step-N/state.json``. ``resume`` continues from the newest complete one (a GraftError when
    there is none); a run without it starts over and removes the old checkpoints.

    ``adapter`` (``graftfx.models.adapters``; ``base`` the model it reads its config from): how to
    call a model that is not graftfx's DiT, with ``conditioning`` (per-latent tensors) and the
    loss of ``schedule``'s prediction type (epsilon, v-prediction or flow matching) on the first
    C output channels. Without it (graftfx's DiT): DiT's loss, eps-MSE + the learned-variance term.
    """
    from graftfx.models.adapters import GraftfxDiTAdapter, NoiseSchedule

    generic = adapter is not None and not isinstance(adapter, GraftfxDiTAdapter)
    schedule = schedule or NoiseSchedule()
    conditioning = dict(conditioning or {})
    out = Path(out_dir)
    store = CheckpointStore(checkpoint_root(out))
    fsdp = world > 1 and cfg.parallel == "fsdp"
    if resume and fsdp:
        raise GraftError("--resume is not supported with --parallel fsdp (sharded optimizer state is not saved); "
                         "fix: rerun without --resume, or use --parallel ddp")
    if cfg.batch_size % world:
        raise GraftError(f"stage 2 batch {cfg.batch_size} does not split over {world} ranks; "
                         f"fix: pass a --batch2 divisible by {world}")
    device = torch.device(device) if device is not None else next(grafted.parameters()).device
    if cfg.objective != "diffusion" and teacher is None:
        raise GraftError(f"stage 2 objective {cfg.objective!r} needs the teacher model")
    if teacher is not None:
        unshare(grafted, teacher)
        teacher.eval().requires_grad_(False)
    spliced = {id(p) for p in grafted.spliced_parameters()}
    params = [(n, p) for n, p in grafted.named_parameters() if cfg.train == "all" or id(p) in spliced]
    for _, p in grafted.named_parameters():
        p.requires_grad_(any(p is q for _, q in params))
    model = grafted.train()
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(grafted)  # parameters become sharded DTensors; forward gathers them
        params = [(n, p) for n, p in grafted.named_parameters() if p.requires_grad]
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(grafted)
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", cfg.warmup, cfg.steps))
    ema = {n: _full(p).detach().clone() for n, p in params}
    diffusion = GaussianDiffusion(num_timesteps=1000)
    sampler = torch.Generator().manual_seed(cfg.seed * 7919)  # the same on every rank: one global batch
    metrics = Metrics(out / (f"metrics-rank{rank}.jsonl" if world > 1 else "metrics.jsonl"))
    start, last = 0, float("nan")
    if resume:
        ckpt = store.require()
        start = _load(ckpt, grafted, opt, sched, ema, sampler)
        last = float(ckpt.meta.get("loss", last))
    elif rank == 0:
        store.clear()  # a fresh run owns its folder: a later --resume never picks up older checkpoints
        for legacy in _LEGACY:
            (store.root / legacy).unlink(missing_ok=True)
    metrics.start(start if resume else None)
    autocast = device.type == "cuda" and cfg.autocast
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)

    def generic_terms(idx, drop, t, noise, x0) -> dict[str, torch.Tensor]:
        """Any adapter's model: its call, its prediction (first C channels), its schedule's target."""
        cond = {k: v[idx[mine]].to(device) for k, v in conditioning.items()}
        if labels is not None:
            cond["labels"] = labels[idx[mine]].to(device)
        cond = adapter.null_conditioning(cond, drop[mine], base)
        x_t = schedule.add_noise(x0, t, noise)
        args, kwargs = adapter.inputs(base, x_t, t, cond)
        channels = x0.shape[1]
        pred = adapter.prediction(base, model(*args, **kwargs), channels).float()
        terms = {}
        if cfg.objective in ("diffusion", "both"):
            terms["diffusion"] = F.mse_loss(pred, schedule.target(x0, t, noise).float())
        if cfg.objective in ("distill", "both"):
            with torch.no_grad():
                target = adapter.prediction(base, teacher(*args, **kwargs), channels)
            terms["distill"] = cfg.distill_weight * F.mse_loss(pred, target.float())
        return terms

    def step(i: int) -> dict[str, float]:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=sampler)
        drop = torch.rand(cfg.batch_size, generator=sampler) < cfg.class_dropout
        if generic:
            t = schedule.draw(sampler, cfg.batch_size)
        else:
            t = torch.randint(diffusion.num_timesteps, (cfg.batch_size,), generator=sampler)
        noise = torch.randn((cfg.batch_size, *latents.shape[1:]), generator=sampler)
        x0 = latents[idx[mine]].to(device).float()
        t, noise = t[mine].to(device), noise[mine].to(device)
        if generic:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                terms = generic_terms(idx, drop, t, noise, x0)
                loss = sum(terms.values())
            return apply(loss, terms)
        y = labels[idx[mine]].to(device)
        y = torch.where(drop[mine].to(device), torch.full_like(y, cfg.num_classes), y)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            terms = {}
            if cfg.objective in ("diffusion", "both"):
                terms["diffusion"] = diffusion.training_losses(model, x0, t, {"y": y}, noise=noise)["loss"].mean()
            if cfg.objective in ("distill", "both"):
                x_t = diffusion.q_sample(x0, t, noise)
                with torch.no_grad():
                    target = teacher(x_t, t, y)
                terms["distill"] = cfg.distill_weight * F.mse_loss(model(x_t, t, y).float(), target.float())
            loss = sum(terms.values())
        return apply(loss, terms)

    def apply(loss, terms) -> dict[str, float]:
        nonlocal last
        values = {"loss/total": loss.item(), **{f"loss/{k}": v.item() for k, v in terms.items()}}
        if not math.isfinite(values["loss/total"]):
            return values  # never applied: the loop stops the run
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            for n, p in params:
                ema[n].mul_(cfg.ema_decay).add_(_full(p.detach()), alpha=1 - cfg.ema_decay)
        last = values["loss/total"]
        return {**values, "lr": sched.get_last_lr()[0]}

    def log(done: int, window: list[dict]) -> str:
        metrics.log({"step": done, **window[-1]})
        return f"loss={last:.4g}"

    def checkpoint(done: int) -> None:
        _save(store, grafted, opt, sched, ema, sampler, done, cfg, last, write=rank == 0)

    run_steps("stage 2", start=start, total=cfg.steps, step=step, log=log, checkpoint=checkpoint,
              log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, store=store,
              hint="lower the stage 2 lr (--lr2) and start again without --resume", progress=progress and rank == 0)
    grafted.eval()
    if rank == 0:
        plot_curves(metrics.path, out / "stage2-loss.png", "stage 2: finetuning loss")
    latest = store.latest()  # ranks > 0 may look before rank 0's last rename: they do not rely on it
    return {"loss": last, "ema": ema, "steps": max(cfg.steps, start),
            "checkpoint": str(latest.folder) if latest is not None else None}


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded DTensor (collective: every rank calls it); else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def apply_ema(grafted: nn.Module, ema: dict[str, torch.Tensor]) -> None:
    """Copy the EMA weights into ``grafted`` (for evaluation and export)."""
    named = dict(grafted.named_parameters())
    with torch.no_grad():
        for n, v in ema.items():
            p = named[n]
            if hasattr(p, "full_tensor"):  # FSDP: unshard into a plain parameter again
                module, _, leaf = n.rpartition(".")
                setattr(grafted.get_submodule(module) if module else grafted, leaf, nn.Parameter(v.clone()))
            else:
                p.copy_(v)


def _save(store: CheckpointStore, grafted, opt, sched, ema, sampler, step: int, cfg: Stage2Config, loss: float,
          write: bool = True) -> None:
    """Rank 0 writes; under FSDP every rank takes part in gathering the full tensors."""
    model = {k: _full(v).detach() for k, v in grafted.state_dict().items()}
    if not write:
        return
    fsdp = any(hasattr(p, "full_tensor") for p in grafted.parameters())
    states = {}
    if not fsdp:  # sharded optimizer states are not checkpointed: FSDP runs do not resume
        states["train"] = {"opt": opt.state_dict(), "sched": sched.state_dict(), "sampler": sampler.get_state(),
                           "rng": rng_state()}
    store.save(step, tensors={"model": model, "ema": ema}, states=states,
               meta={"config": asdict(cfg), "resumable": not fsdp, "loss": loss})


def _load(ckpt, grafted, opt, sched, ema, sampler) -> int:
    if not ckpt.meta.get("resumable", False) or not ckpt.has("train"):
        raise GraftError(f"checkpoint {ckpt.folder} comes from an FSDP run, which does not resume; "
                         "fix: rerun without --resume, or use --parallel ddp")
    grafted.load_state_dict(ckpt.tensors("model"), strict=True)
    saved = ckpt.tensors("ema")
    if saved.keys() != ema.keys():
        raise GraftError(f"checkpoint {ckpt.folder} holds the EMA of {len(saved)} parameters, this run trains "
                         f"{len(ema)}; fix: resume with the --train setting of that run, or start without --resume")
    for k, v in saved.items():
        ema[k].copy_(v)
    train = ckpt.state("train")
    opt.load_state_dict(train["opt"])
    sched.load_state_dict(train["sched"])
    sampler.set_state(train["sampler"])
    restore_rng(train["rng"])
    return ckpt.step
