"""Stage 1, activation distillation: each spliced operator learns, on its own, to map its region's
teacher input to the teacher output. All regions train in one loop on the same minibatch
indices; only the spliced modules are held (the teacher is not needed when reading a cache).

Defaults follow the paper's release: AdamW, lr 5e-4 for attention replacements and 1e-3 for
MLP replacements, weight decay 0, grad clip 10, batch 8, constant lr; loss L1 for attention
replacements and L2 for MLPs (per rule; Huber selectable).
"""
from __future__ import annotations

import math
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from graftfx.errors import GraftError
from graftfx.match.paths import short_name
from graftfx.match.region import feature_of
from graftfx.training import (CheckpointStore, Metrics, agreed_checkpoint, lr_lambda, plot_curves, restore_rng, rng_state,
                              run_steps)

LOSSES = ("l1", "l2", "huber")


@dataclass
class Stage1Config:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 5e-4            # attention replacements (the paper's release)
    lr_mlp: float = 1e-3        # MLP replacements
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    warmup: int = 0
    schedule: str = "constant"  # "constant" (paper) or "cosine"
    huber_delta: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    autocast: bool = True       # bf16 autocast, on CUDA only

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage 1 {name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"stage 1 schedule must be constant or cosine, got {self.schedule!r}")
        if self.lr <= 0 or self.lr_mlp <= 0:
            raise ValueError("stage 1 learning rates must be > 0")


@dataclass
class RegionJob:
    """One spliced operator to train: where it sits and what it learns from."""

    path: str          # the region's module path in the teacher (cache key)
    target: str        # the operator's module path in the grafted model
    module: nn.Module
    loss: str          # l1 | l2 | huber
    kind: str          # region kind (mlp replacements use lr_mlp)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} for {self.path} is not one of {', '.join(LOSSES)}")


def loss_fn(name: str, pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    if name == "l1":
        return F.l1_loss(pred, target)
    if name == "l2":
        return F.mse_loss(pred, target)
    return F.huber_loss(pred, target, delta=delta)


# Files of the checkpoint layout before graftfx.training (one folder, replaced file by file).
_LEGACY = ("params.safetensors", "optim.pt", "state.json")


def checkpoint_root(out_dir, rank: int = 0, world: int = 1) -> Path:
    """Where stage 1 keeps its step checkpoints: ``OUT/checkpoint`` (``OUT/checkpoint/rankR`` per rank)."""
    base = Path(out_dir) / "checkpoint"
    return base / f"rank{rank}" if world > 1 else base


def train_stage1(jobs: list[RegionJob], source, cfg: Stage1Config, out_dir, *, resume: bool = False,
                 rank: int = 0, world: int = 1, device=None, progress: bool = True, assignment=None,
                 groups: dict | None = None) -> dict:
    """Train ``jobs`` on batches from ``source`` (an ActivationCache or OnlineTeacher).

    With ``world`` > 1, rank r trains the jobs ``assignment`` (``graftfx.distill.assign``) gives it
    (default: jobs r, r+world, ...); every rank draws the same batch indices, so the result equals
    a single-process run with the same seed. A region trained by a group of ranks (``groups``:
    region path -> its process group) gives each rank an equal slice of the batch and averages
    the gradients in the group: the single-process result up to the order of fp32 sums. Resuming
    under torchrun, the ranks agree on the newest step every rank has. Each rank writes its
    own checkpoints (``checkpoint_root``): ``step-N/params.safetensors`` (its operators' weights by
    grafted-model key), ``step-N/train.safetensors`` (optimizer, scheduler, sampler and RNG
    state), ``step-N/state.json``. ``resume`` continues from the newest complete one (a
    GraftError when there is none); a run without it starts over and removes the old checkpoints.
    Returns {"losses": {path: last loss}, "steps": n, "checkpoint": that newest step folder}.
    """
    out = Path(out_dir)
    store = CheckpointStore(checkpoint_root(out, rank, world))
    if assignment is None:
        mine = [j for i, j in enumerate(jobs) if i % world == rank]
        slices = {j.path: (0, 1) for j in mine}
    else:
        mine = [j for j in jobs if rank in assignment.groups.get(j.path, ())]
        slices = {j.path: assignment.group_index(j.path, rank) for j in mine}
    groups = groups or {}
    widest = max((n for _, n in slices.values()), default=1)
    if cfg.batch_size % widest:
        raise GraftError(f"stage 1 batch {cfg.batch_size} does not split over the {widest} ranks that train one "
                         "region; fix: pass a --batch1 divisible by it")
    paths = [j.path for j in mine]
    device = torch.device(device) if device is not None else _device_of(mine)
    opts, scheds = {}, {}
    for job in mine:
        job.module.to(device).train()
        lr = cfg.lr_mlp if job.kind == "mlp" else cfg.lr
        opts[job.path] = torch.optim.AdamW(job.module.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        scheds[job.path] = torch.optim.lr_scheduler.LambdaLR(opts[job.path], lr_lambda(cfg.schedule, cfg.warmup, cfg.steps))
    sampler = torch.Generator().manual_seed(cfg.seed)
    metrics = Metrics(out / (f"metrics-rank{rank}.jsonl" if world > 1 else "metrics.jsonl"))
    last = {p: float("nan") for p in paths}
    start = 0
    if resume:
        ckpt = agreed_checkpoint(store, world, "stage 1")
        start = _load(ckpt, mine, opts, scheds, sampler)
        last.update({p: v for p, v in ckpt.meta.get("losses", {}).items() if p in last})
    else:
        _clear_old_checkpoints(out, rank, world)
    metrics.start(start if resume else None)
    autocast = device.type == "cuda" and cfg.autocast

    rowwise = {p: set(_row_fields(source, p)) for p in paths}

    def step(i: int) -> dict[str, float]:
        idx = torch.randint(source.samples, (cfg.batch_size,), generator=sampler).tolist()
        batch = source.batch(idx, paths=paths)
        values = {}
        for job in mine:
            pos, size = slices[job.path]
            fields = batch[job.path]
            if size > 1:   # this rank's slice of the batch (constant fields have no batch dimension)
                n = cfg.batch_size // size
                fields = {k: v[pos * n:(pos + 1) * n] if k in rowwise[job.path] else v for k, v in fields.items()}
            args, kwargs, targets = job_inputs(job, fields, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                pred = job.module(*args, **kwargs)
            preds = pred if isinstance(pred, tuple) else (pred,)
            if len(preds) != len(targets):
                raise GraftError(f"{job.target} returned {len(preds)} outputs but its region {job.path} has "
                                 f"{len(targets)}; the operator must return one tensor per region output")
            loss = sum(loss_fn(job.loss, p.float(), y, cfg.huber_delta) for p, y in zip(preds, targets))
            group = groups.get(job.path) if size > 1 else None
            value = _group_mean(loss.detach(), group, size).item()
            values[f"loss/{job.path}"] = value
            if not math.isfinite(value):
                continue  # never applied: the loop stops the run after this step
            opt = opts[job.path]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if group is not None:
                _average_gradients(job.module, group, size)
            nn.utils.clip_grad_norm_(job.module.parameters(), cfg.grad_clip)
            opt.step()
            scheds[job.path].step()
            last[job.path] = value
        values["lr"] = scheds[mine[0].path].get_last_lr()[0] if mine else 0.0
        return values

    def log(done: int, window: list[dict]) -> str:
        metrics.log({"step": done, **window[-1]})
        return " ".join(f"{short_name(p)}:{v:.3g}" for p, v in last.items())[:120]

    def checkpoint(done: int) -> None:
        _save(store, mine, opts, scheds, sampler, done, cfg, last)

    run_steps(f"stage 1{f' rank {rank}' if world > 1 else ''}", start=start, total=cfg.steps, step=step, log=log,
              checkpoint=checkpoint, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, store=store,
              hint="lower the stage 1 lr (--lr1, --lr1-mlp) and start again without --resume, or check the cache",
              progress=progress)
    for job in mine:
        job.module.eval()
    if rank == 0:
        plot_curves(metrics.path, out / "stage1-loss.png", "stage 1: per-region loss")
    return {"losses": last, "steps": max(cfg.steps, start), "checkpoint": str(store.require("stage 1").folder)}


def job_inputs(job: RegionJob, fields: dict[str, torch.Tensor], device) -> tuple[tuple, dict, list[torch.Tensor]]:
    """The operator's call on one batch of its region's teacher fields, as the splicer wires it:
    input (and context) positionally, the extra inputs its ``takes`` allows as keywords; and
    the targets: the output, then the extra outputs in the region's order."""
    def dev(v: torch.Tensor) -> torch.Tensor:
        v = v.to(device)
        return v.float() if v.is_floating_point() else v

    takes = getattr(job.module, "takes", frozenset())
    args = (dev(fields["input"]),) + ((dev(fields["context"]),) if "context" in fields else ())
    kwargs = {k[3:]: dev(v) for k, v in fields.items() if k.startswith("in:") and feature_of(k[3:]) in takes}
    targets = [dev(fields["output"])] + [dev(v) for k, v in fields.items() if k.startswith("out:")]
    return args, kwargs, targets


def _row_fields(source, path: str) -> list[str]:
    """The fields of ``path`` that have a row per sample (a cache's shard fields; online: all
    but the tap's constants)."""
    index = getattr(source, "index_of", None)
    if index is not None:
        return list(index(path)["fields"])
    tap = next((t for t in getattr(source, "taps", ()) if t.path == path), None)
    return list(tap.fields()) if tap is not None else ["input", "output", "context"]


def _group_mean(value: torch.Tensor, group, size: int) -> torch.Tensor:
    if group is None:
        return value
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value, group=group)
    return value / size


def _average_gradients(module: nn.Module, group, size: int) -> None:
    """Mean of the group's gradients (each rank's loss is the mean over its equal slice, so the
    mean of the slices' gradients is the full batch's)."""
    import torch.distributed as dist

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _device_of(jobs) -> torch.device:
    for j in jobs:
        for p in j.module.parameters():
            return p.device
    return torch.device("cpu")


def _clear_old_checkpoints(out: Path, rank: int, world: int) -> None:
    """A fresh run owns its folder: earlier checkpoints (any world size, any layout) go, so a later
    --resume or merge can never pick them up. Each checkpoint folder has one remover."""
    base = out / "checkpoint"
    CheckpointStore(checkpoint_root(out, rank, world)).clear()
    if rank != 0:
        return
    if world > 1:
        CheckpointStore(base).clear()
    for legacy in _LEGACY:
        (base / legacy).unlink(missing_ok=True)
    if base.is_dir():
        for entry in base.iterdir():
            m = re.fullmatch(r"rank(\d+)", entry.name)
            if m and entry.is_dir() and (world == 1 or int(m.group(1)) >= world):
                shutil.rmtree(entry, ignore_errors=True)


def _save(store: CheckpointStore, jobs, opts, scheds, sampler, step: int, cfg: Stage1Config, losses: dict) -> None:
    """One step folder: the spliced parameters, the optimizer/scheduler/sampler/RNG state, the record."""
    params = {f"{j.target}.{k}": v for j in jobs for k, v in j.module.state_dict().items()}
    train = {"opt": {j.path: opts[j.path].state_dict() for j in jobs},
             "sched": {j.path: scheds[j.path].state_dict() for j in jobs},
             "sampler": sampler.get_state(), "rng": rng_state()}
    store.save(step, tensors={"params": params}, states={"train": train},
               meta={"config": asdict(cfg), "regions": [j.path for j in jobs], "losses": losses})


def _load(ckpt, jobs, opts, scheds, sampler) -> int:
    regions = [j.path for j in jobs]
    if ckpt.meta.get("regions") != regions:
        raise GraftError(f"checkpoint {ckpt.folder} was made for regions {ckpt.meta.get('regions')}, not {regions}; "
                         "fix: resume with the rules and world size of that run, or use a new --out")
    params = ckpt.tensors("params")
    for j in jobs:
        own = {k[len(j.target) + 1:]: v for k, v in params.items() if k.startswith(j.target + ".")}
        j.module.load_state_dict(own, strict=True)
    train = ckpt.state("train")
    for j in jobs:
        opts[j.path].load_state_dict(train["opt"][j.path])
        scheds[j.path].load_state_dict(train["sched"][j.path])
    sampler.set_state(train["sampler"])
    restore_rng(train["rng"])
    return ckpt.step


def merge_rank_checkpoints(out_dir, world: int) -> dict[str, torch.Tensor]:
    """All ranks' trained parameters (each rank's newest complete checkpoint), by grafted-model key."""
    merged: dict[str, torch.Tensor] = {}
    for r in range(world):
        store = CheckpointStore(checkpoint_root(out_dir, r, world))
        merged.update(store.require(f"stage 1 rank {r}", "rerun stage 1 (a rank failed before its first "
                                                         "checkpoint)").tensors("params"))
    return merged
