"""Stage 1, activation distillation: each spliced operator learns, on its own, to map its region's
teacher input to the teacher output. All regions train in one loop on the same minibatch
indices; only the spliced modules are held (the teacher is not needed when reading a cache).

Defaults follow the paper's release: AdamW, lr 5e-4 for attention replacements and 1e-3 for
MLP replacements, weight decay 0, grad clip 10, batch 8, constant lr; loss L1 for attention
replacements and L2 for MLPs (per rule; Huber selectable).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from graftfx.errors import GraftError

from graftfx.io import atomic_path, atomic_torch_save, atomic_write_json

from graftfx.match.paths import short_name

from .train_utils import Metrics, lr_lambda, plot_curves, read_json, restore_rng, rng_state

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


def train_stage1(jobs: list[RegionJob], source, cfg: Stage1Config, out_dir, *, resume: bool = False,
                 rank: int = 0, world: int = 1, device=None, progress: bool = True) -> dict:
    """Train ``jobs`` on batches from ``source`` (an ActivationCache or OnlineTeacher).

    With ``world`` > 1, rank r trains jobs r, r+world, ...; every rank draws the same batch
    indices, so the result equals a single-process run with the same seed. Returns
    {"losses": {path: last loss}, "steps": n, "checkpoint": folder}.
    """
    out = Path(out_dir)
    ckpt = out / "checkpoint" / (f"rank{rank}" if world > 1 else "")
    ckpt.mkdir(parents=True, exist_ok=True)
    mine = [j for i, j in enumerate(jobs) if i % world == rank]
    device = torch.device(device) if device is not None else _device_of(mine)
    opts, scheds = {}, {}
    for job in mine:
        job.module.to(device).train()
        lr = cfg.lr_mlp if job.kind == "mlp" else cfg.lr
        opts[job.path] = torch.optim.AdamW(job.module.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        scheds[job.path] = torch.optim.lr_scheduler.LambdaLR(opts[job.path], lr_lambda(cfg.schedule, cfg.warmup, cfg.steps))
    sampler = torch.Generator().manual_seed(cfg.seed)
    metrics = Metrics(out / (f"metrics-rank{rank}.jsonl" if world > 1 else "metrics.jsonl"))
    start = 0
    if resume and (ckpt / "state.json").exists():
        start = _load(ckpt, mine, opts, scheds, sampler)
        metrics.truncate(start)
    elif not resume:
        metrics.truncate(0)
    last = {j.path: float("nan") for j in mine}
    autocast = device.type == "cuda" and cfg.autocast
    bar = tqdm(range(start, cfg.steps), desc=f"stage 1{f' rank {rank}' if world > 1 else ''}", disable=not progress,
               initial=start, total=cfg.steps)
    for step in bar:
        idx = torch.randint(source.samples, (cfg.batch_size,), generator=sampler).tolist()
        batch = source.batch(idx, paths=[j.path for j in mine])
        for job in mine:
            fields = batch[job.path]
            x, y = fields["input"].to(device).float(), fields["output"].to(device).float()
            args = (x, fields["context"].to(device).float()) if "context" in fields else (x,)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                pred = job.module(*args)
            loss = loss_fn(job.loss, pred.float(), y, cfg.huber_delta)
            if not torch.isfinite(loss):
                raise GraftError(f"stage 1: loss of region {job.path} is {loss.item()} at step {step + 1}; the last good "
                                 f"checkpoint is in {ckpt} (lower the lr or check the cache)")
            opt = opts[job.path]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(job.module.parameters(), cfg.grad_clip)
            opt.step()
            scheds[job.path].step()
            last[job.path] = loss.item()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics.log({"step": done, **{f"loss/{p}": v for p, v in last.items()},
                         "lr": scheds[mine[0].path].get_last_lr()[0] if mine else 0.0})
            bar.set_postfix_str(" ".join(f"{short_name(p)}:{v:.3g}" for p, v in last.items())[:120])
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save(ckpt, mine, opts, scheds, sampler, done, cfg)
    bar.close()
    for job in mine:
        job.module.eval()
    if rank == 0:
        plot_curves(metrics.path, out / "stage1-loss.png", "stage 1: per-region loss")
    return {"losses": last, "steps": cfg.steps, "checkpoint": str(ckpt)}


def _device_of(jobs) -> torch.device:
    for j in jobs:
        for p in j.module.parameters():
            return p.device
    return torch.device("cpu")


def _save(folder: Path, jobs, opts, scheds, sampler, step: int, cfg: Stage1Config) -> None:
    """Spliced parameters (safetensors) + optimizer/scheduler/RNG state; the state.json that
    names the step is written last, so a crash mid-save leaves the previous checkpoint valid."""
    from safetensors.torch import save_file

    tensors = {f"{j.target}.{k}": v.detach().contiguous().cpu() for j in jobs for k, v in j.module.state_dict().items()}
    with atomic_path(folder / "params.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_torch_save(folder / "optim.pt", {"opt": {j.path: opts[j.path].state_dict() for j in jobs},
                                      "sched": {j.path: scheds[j.path].state_dict() for j in jobs},
                                      "sampler": sampler.get_state(), "rng": rng_state()})
    atomic_write_json(folder / "state.json", {"step": step, "config": asdict(cfg), "regions": [j.path for j in jobs]})


def _load(folder: Path, jobs, opts, scheds, sampler) -> int:
    from safetensors.torch import load_file

    state = read_json(folder / "state.json")
    if state["regions"] != [j.path for j in jobs]:
        raise GraftError(f"checkpoint {folder} was made for regions {state['regions']}, not these; use a new --out")
    params = load_file(str(folder / "params.safetensors"))
    for j in jobs:
        own = {k[len(j.target) + 1:]: v for k, v in params.items() if k.startswith(j.target + ".")}
        j.module.load_state_dict(own, strict=True)
    blob = torch.load(folder / "optim.pt", weights_only=True)
    for j in jobs:
        opts[j.path].load_state_dict(blob["opt"][j.path])
        scheds[j.path].load_state_dict(blob["sched"][j.path])
    sampler.set_state(blob["sampler"])
    restore_rng(blob["rng"])
    return int(state["step"])


def merge_rank_checkpoints(out_dir, world: int) -> dict[str, torch.Tensor]:
    """All ranks' trained parameters, by grafted-model key (for the final export)."""
    from safetensors.torch import load_file

    merged: dict[str, torch.Tensor] = {}
    base = Path(out_dir) / "checkpoint"
    for r in range(world):
        merged.update(load_file(str((base / f"rank{r}" if world > 1 else base) / "params.safetensors")))
    return merged
