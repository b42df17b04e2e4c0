"""Stage 2, lightweight finetuning of the grafted model end to end.

Objectives: the DiT diffusion loss on real data (latents + labels), output distillation
against the teacher (MSE of the full model output on the same noised inputs), or both.
Trains all parameters (the paper) or only the spliced ones; AdamW with warmup; EMA of the
trained weights; bf16 autocast on CUDA; DDP (or FSDP2) when run under torchrun.

Under FSDP (``parallel="fsdp"``) the grafted graph is cut into its blocks
(``graftfx.training.blockwise``), each block one ``fully_shard`` unit with bf16 parameters in
forward/backward and fp32 gradient reduction (``fsdp_precision``), activations recomputed in
backward (``activation_checkpointing``), and every rank checkpoints its own shards (parameters,
EMA, AdamW moments) into its own folder: a run resumes with no shared filesystem. Under DDP rank 0
writes the checkpoints and, on resume, reads them and sends them to the other ranks.

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
from graftfx.training import (CheckpointStore, Metrics, agreed_checkpoint, lr_lambda, plot_curves, restore_rng,
                              rng_state, run_steps)
from graftfx.training.blockwise import split_blocks
from graftfx.training.fsdp import (PRECISIONS, full, load_local, load_local_optimizer_state, local,
                                   local_optimizer_state, shard, unshard_into)

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
    fsdp_precision: str = "bf16"  # FSDP: "bf16" (bf16 compute, fp32 reduction and master weights) or "fp32"
    activation_checkpointing: bool | None = None  # recompute each block in backward; None: on under FSDP
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
        if self.fsdp_precision not in PRECISIONS:
            raise ValueError(f"stage 2 fsdp_precision must be one of {', '.join(PRECISIONS)}, got {self.fsdp_precision!r}")
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


def checkpoint_root(out_dir, rank: int = 0, world: int = 1, parallel: str = "ddp") -> Path:
    """Where stage 2 keeps its step checkpoints: ``OUT/checkpoint`` (written by rank 0), or under
    FSDP each rank's own ``OUT/checkpoint/rankR-of-W`` (its shards)."""
    root = Path(out_dir) / "checkpoint"
    return root / f"rank{rank}-of-{world}" if world > 1 and parallel == "fsdp" else root


def has_checkpoint(out_dir, rank: int = 0, world: int = 1, parallel: str = "ddp") -> bool:
    """Whether ``out_dir`` holds a complete stage 2 checkpoint (a ``--stage both --resume`` of a
    run stopped before stage 2 began starts stage 2 afresh instead of failing). Under torchrun
    (collective) the ranks agree: rank 0's answer under DDP, every rank's own under FSDP."""
    have = CheckpointStore(checkpoint_root(out_dir, rank, world, parallel)).latest() is not None
    if world == 1:
        return have
    import torch.distributed as dist

    flag = torch.tensor([int(have)])
    if parallel == "fsdp":
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    else:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def train_stage2(grafted, teacher, latents: torch.Tensor, labels: torch.Tensor | None, cfg: Stage2Config, out_dir, *,
                 resume: bool = False, rank: int = 0, world: int = 1, device=None, progress: bool = True,
                 adapter=None, base=None, conditioning: dict | None = None, schedule=None,
                 unconditional: dict | None = None, log=print) -> dict:
    """Finetune ``grafted`` (in place). Returns {"loss": last loss, "ema": {name: tensor}, "steps": n,
    "checkpoint": the newest step folder}.

    Checkpoints (``checkpoint_root``): ``step-N/model.safetensors`` (the whole model),
    ``step-N/ema.safetensors`` (EMA of the trained parameters), ``step-N/train.safetensors``
    (optimizer, scheduler, sampler and RNG state) and ``step-N/state.json``; rank 0 writes them,
    or under FSDP every rank its own shards of each. ``resume`` continues from the newest complete
    one (under FSDP the newest every rank has; a GraftError when there is none); a run without it
    starts over and removes the old checkpoints.

    ``adapter`` (``graftfx.models.adapters``; ``base`` the model it reads its config from): how to
    call a model that is not graftfx's DiT, with ``conditioning`` (per-latent tensors) and the
    loss of ``schedule``'s prediction type (epsilon, v-prediction or flow matching) on the first
    C output channels. Without it (graftfx's DiT): DiT's loss, eps-MSE + the learned-variance term.
    Conditioning is dropped with probability ``class_dropout`` (classifier-free guidance): to the
    null class, or to ``unconditional`` (one sample's conditioning, as the empty caption's
    ``embeddings`` (L, D) and ``mask`` (L,)) for models with no null class.
    """
    from graftfx.models.adapters import GraftfxDiTAdapter, NoiseSchedule

    generic = adapter is not None and not isinstance(adapter, GraftfxDiTAdapter)
    if generic and cfg.class_dropout > 0 and not adapter.has_null(unconditional) and rank == 0:
        log("stage 2: no unconditional input for this model (the captions carry no encoded empty caption; "
            "'graftfx data captions' writes one), so no conditioning is dropped and no unconditional branch trains")
    schedule = schedule or NoiseSchedule()
    conditioning = dict(conditioning or {})
    out = Path(out_dir)
    fsdp = world > 1 and cfg.parallel == "fsdp"
    store = CheckpointStore(checkpoint_root(out, rank, world, cfg.parallel))
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
    model, split = grafted.train(), None
    recompute = cfg.activation_checkpointing if cfg.activation_checkpointing is not None else fsdp
    if fsdp or recompute:   # the graph cut into its blocks: the units FSDP shards and recomputes
        split = split_blocks(grafted, activation_checkpointing=recompute)
        model = split.module.train()
    if fsdp:   # parameters become sharded DTensors; each unit gathers its own in forward and backward
        shard(split, cfg.fsdp_precision)
        params = [(split.names[n], p) for n, p in model.named_parameters() if p.requires_grad]
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", cfg.warmup, cfg.steps))
    ema = {n: p.detach().clone() for n, p in params}   # sharded like the parameters under FSDP
    diffusion = GaussianDiffusion(num_timesteps=1000)
    sampler = torch.Generator().manual_seed(cfg.seed * 7919)  # the same on every rank: one global batch
    metrics = Metrics(out / (f"metrics-rank{rank}.jsonl" if world > 1 else "metrics.jsonl"))
    start, last = 0, float("nan")
    state = _State(grafted, split if fsdp else None, opt, sched, ema, sampler)
    if resume and fsdp:   # every rank its own shards, from the newest step all ranks have
        ckpt = agreed_checkpoint(store, world, "stage 2")
        start, last = state.load(ckpt), float(ckpt.meta.get("loss", last))
    elif resume:   # rank 0 reads; under DDP it sends the state to the other ranks
        if rank == 0:
            ckpt = store.require()
            start, last = state.load(ckpt), float(ckpt.meta.get("loss", last))
        if world > 1:
            start, last = state.broadcast(start, last, rank)
    elif rank == 0 or fsdp:
        store.clear()  # a fresh run owns its folder: a later --resume never picks up older checkpoints
        for legacy in _LEGACY:
            (store.root / legacy).unlink(missing_ok=True)
    metrics.start(start if resume else None)
    # bf16 FSDP on any device: a traced graph may cast to fp32 where its model did (timestep
    # embeddings), and autocast gives the matmuls that then meet bf16 weights one dtype
    autocast = cfg.autocast and (device.type == "cuda" or (fsdp and cfg.fsdp_precision == "bf16"))
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)

    def generic_terms(idx, drop, t, noise, x0) -> dict[str, torch.Tensor]:
        """Any adapter's model: its call, its prediction (first C channels), its schedule's target."""
        cond = {k: v[idx[mine]].to(device) for k, v in conditioning.items()}
        if labels is not None:
            cond["labels"] = labels[idx[mine]].to(device)
        cond = adapter.null_conditioning(cond, drop[mine], base, unconditional)
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
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                terms = generic_terms(idx, drop, t, noise, x0)
                loss = sum(terms.values())
            return apply(loss, terms)
        y = labels[idx[mine]].to(device)
        y = torch.where(drop[mine].to(device), torch.full_like(y, cfg.num_classes), y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
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
                ema[n].mul_(cfg.ema_decay).add_(p.detach(), alpha=1 - cfg.ema_decay)
        last = values["loss/total"]
        return {**values, "lr": sched.get_last_lr()[0]}

    def log_metrics(done: int, window: list[dict]) -> str:
        metrics.log({"step": done, **window[-1]})
        return f"loss={last:.4g}"

    def checkpoint(done: int) -> None:
        if rank == 0 or fsdp:
            state.save(store, done, {"config": asdict(cfg), "loss": last})

    run_steps("stage 2", start=start, total=cfg.steps, step=step, log=log_metrics, checkpoint=checkpoint,
              log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, store=store,
              hint="lower the stage 2 lr (--lr2) and start again without --resume", progress=progress and rank == 0)
    if fsdp:   # the trained values back into the grafted model, unsharded
        unshard_into(grafted, split)
        ema = {n: full(v) for n, v in ema.items()}
    grafted.eval()
    if rank == 0:
        plot_curves(metrics.path, out / "stage2-loss.png", "stage 2: finetuning loss")
    latest = store.latest()  # ranks > 0 may look before rank 0's last rename: they do not rely on it
    return {"loss": last, "ema": ema, "steps": max(cfg.steps, start),
            "checkpoint": str(latest.folder) if latest is not None else None}


def apply_ema(grafted: nn.Module, ema: dict[str, torch.Tensor]) -> None:
    """Copy the EMA weights into ``grafted`` (for evaluation and export)."""
    named = dict(grafted.named_parameters())
    with torch.no_grad():
        for n, v in ema.items():
            named[n].copy_(v)


class _State:
    """What a stage 2 checkpoint holds, and how it is written, read and shared.

    ``module`` is the model whose state is saved: the grafted model, or under FSDP the sharded
    block split (``names`` maps its parameter names to the grafted model's), saved shard by shard.
    """

    def __init__(self, grafted, split, opt, sched, ema, sampler):
        self.grafted = grafted
        self.module = split.module if split is not None else grafted
        self.names = split.names if split is not None else None
        self.opt, self.sched, self.ema, self.sampler = opt, sched, ema, sampler

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.names is None:
            return {k: v.detach() for k, v in self.module.state_dict().items()}
        out = {self.names[n]: local(p) for n, p in self.module.named_parameters()}
        out.update({k: v.detach() for k, v in self.grafted.named_buffers()})
        return out

    def save(self, store: CheckpointStore, step: int, meta: dict) -> None:
        sharded = self.names is not None
        opt = local_optimizer_state(self.opt) if sharded else self.opt.state_dict()
        states = {"train": {"opt": opt, "sched": self.sched.state_dict(), "sampler": self.sampler.get_state(),
                            "rng": rng_state()}}
        ema = {n: local(v) for n, v in self.ema.items()}
        shards = sorted(self.names[n] for n, _ in self.module.named_parameters()) if sharded else []
        store.save(step, tensors={"model": self.model_state(), "ema": ema}, states=states,
                   meta={**meta, "resumable": True, "sharded": sharded, "shards": shards})

    def load(self, ckpt) -> int:
        if not ckpt.meta.get("resumable", False) or not ckpt.has("train"):
            raise GraftError(f"checkpoint {ckpt.folder} was written by an FSDP run of an older graftfx, which "
                             "did not save its optimizer state; fix: rerun without --resume")
        if bool(ckpt.meta.get("sharded", False)) != (self.names is not None):
            raise GraftError(f"checkpoint {ckpt.folder} is {'sharded (FSDP)' if ckpt.meta.get('sharded') else 'whole'}"
                             f", this run is not; fix: resume with the --parallel setting of that run")
        saved = ckpt.tensors("model")
        if self.names is None:
            self.module.load_state_dict(saved, strict=True)
        else:
            for n, p in self.module.named_parameters():
                load_local(p, saved[self.names[n]], self.names[n])
            with torch.no_grad():
                for k, b in self.grafted.named_buffers():
                    b.copy_(saved[k])
        ema = ckpt.tensors("ema")
        if ema.keys() != self.ema.keys():
            raise GraftError(f"checkpoint {ckpt.folder} holds the EMA of {len(ema)} parameters, this run trains "
                             f"{len(self.ema)}; fix: resume with the --train setting of that run, or start without "
                             "--resume")
        for k, v in ema.items():
            load_local(self.ema[k], v, f"EMA {k}")
        train = ckpt.state("train")
        if self.names is None:
            self.opt.load_state_dict(train["opt"])
        else:
            load_local_optimizer_state(self.opt, train["opt"])
        self.sched.load_state_dict(train["sched"])
        self.sampler.set_state(train["sampler"])
        restore_rng(train["rng"])
        return ckpt.step

    def broadcast(self, start: int, last: float, rank: int) -> tuple[int, float]:
        """DDP resume: rank 0's loaded state to every rank (collective), no shared files."""
        import torch.distributed as dist

        with torch.no_grad():
            for t in [*self.module.state_dict().values(), *self.ema.values()]:
                dist.broadcast(t, src=0)
        box = [{"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "sampler": self.sampler.get_state(),
                "rng": rng_state(), "start": start, "last": last} if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        got = box[0]
        if rank != 0:
            self.opt.load_state_dict(got["opt"])
            self.sched.load_state_dict(got["sched"])
            self.sampler.set_state(got["sampler"])
            restore_rng(got["rng"])
        return got["start"], got["last"]
