"""Stage 2, lightweight finetuning of the grafted model end to end.

Objectives: the DiT diffusion loss on real data (latents + labels), output distillation
against the teacher (MSE of the full model output on the same noised inputs), or both.
Trains all parameters (the paper) or only the spliced ones; AdamW with warmup; EMA of the
trained weights; bf16 autocast on CUDA; DDP when run under torchrun.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from graftfx.errors import GraftError
from graftfx.models.diffusion import GaussianDiffusion

from graftfx.io import atomic_path, atomic_torch_save, atomic_write_json

from .train_utils import Metrics, lr_lambda, plot_curves, read_json, restore_rng, rng_state

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


def train_stage2(grafted, teacher, latents: torch.Tensor, labels: torch.Tensor, cfg: Stage2Config, out_dir, *,
                 resume: bool = False, rank: int = 0, world: int = 1, device=None, progress: bool = True) -> dict:
    """Finetune ``grafted`` (in place). Returns {"loss": last loss, "ema": {name: tensor}}."""
    out = Path(out_dir)
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
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
    if world > 1 and cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(grafted)  # parameters become sharded DTensors; forward gathers them
        params = [(n, p) for n, p in grafted.named_parameters() if p.requires_grad]
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(grafted)
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", cfg.warmup, cfg.steps))
    ema = {n: _full(p).detach().clone() for n, p in params}
    diffusion = GaussianDiffusion(num_timesteps=1000)
    sampler = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    metrics = Metrics(out / (f"metrics-rank{rank}.jsonl" if world > 1 else "metrics.jsonl"))
    start = 0
    if resume and cfg.parallel == "fsdp" and world > 1:
        raise GraftError("--resume is not supported with --parallel fsdp (sharded optimizer state is not saved); "
                         "use --parallel ddp")
    if resume and (ckpt / "state.json").exists():
        start = _load(ckpt, grafted, opt, sched, ema, sampler)
        metrics.truncate(start)
    elif not resume:
        metrics.truncate(0)
    autocast = device.type == "cuda" and cfg.autocast
    last = float("nan")
    bar = tqdm(range(start, cfg.steps), desc="stage 2", disable=not progress or rank != 0, initial=start, total=cfg.steps)
    for step in bar:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=sampler)
        x0, y = latents[idx].to(device).float(), labels[idx].to(device)
        drop = torch.rand(len(y), generator=sampler) < cfg.class_dropout
        y = torch.where(drop.to(device), torch.full_like(y, cfg.num_classes), y)
        t = torch.randint(diffusion.num_timesteps, (len(y),), generator=sampler).to(device)
        noise = torch.randn(x0.shape, generator=sampler).to(device)
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
        if not torch.isfinite(loss):
            raise GraftError(f"stage 2: loss is {loss.item()} at step {step + 1} "
                             f"({', '.join(f'{k}={v.item():.3g}' for k, v in terms.items())}); the last good checkpoint "
                             f"is in {ckpt} (lower the lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            for n, p in params:
                ema[n].mul_(cfg.ema_decay).add_(_full(p.detach()), alpha=1 - cfg.ema_decay)
        last = loss.item()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics.log({"step": done, "loss/total": last, **{f"loss/{k}": v.item() for k, v in terms.items()},
                         "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{last:.4g}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save(ckpt, grafted, opt, sched, ema, sampler, done, cfg, write=rank == 0)
    bar.close()
    grafted.eval()
    if rank == 0:
        plot_curves(metrics.path, out / "stage2-loss.png", "stage 2: finetuning loss")
    return {"loss": last, "ema": ema, "steps": cfg.steps}


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


def _save(folder: Path, grafted, opt, sched, ema, sampler, step: int, cfg: Stage2Config, write: bool = True) -> None:
    """Rank 0 writes; under FSDP every rank takes part in gathering the full tensors."""
    from safetensors.torch import save_file

    state = {k: _full(v).detach().contiguous().cpu().clone() for k, v in grafted.state_dict().items()}
    if not write:
        return
    fsdp = any(hasattr(p, "full_tensor") for p in grafted.parameters())
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    with atomic_path(folder / "ema.safetensors") as tmp:
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp))
    if not fsdp:  # sharded optimizer states are not checkpointed: FSDP runs do not resume
        atomic_torch_save(folder / "optim.pt", {"opt": opt.state_dict(), "sched": sched.state_dict(),
                                          "sampler": sampler.get_state(), "rng": rng_state()})
    atomic_write_json(folder / "state.json", {"step": step, "config": asdict(cfg), "resumable": not fsdp})


def _load(folder: Path, grafted, opt, sched, ema, sampler) -> int:
    from safetensors.torch import load_file

    state = read_json(folder / "state.json")
    if not state.get("resumable", True):
        raise GraftError(f"checkpoint {folder} comes from an FSDP run, which does not resume; rerun without --resume "
                         "or use --parallel ddp")
    grafted.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    for k, v in load_file(str(folder / "ema.safetensors")).items():
        ema[k].copy_(v)
    blob = torch.load(folder / "optim.pt", weights_only=True)
    opt.load_state_dict(blob["opt"])
    sched.load_state_dict(blob["sched"])
    sampler.set_state(blob["sampler"])
    restore_rng(blob["rng"])
    return int(state["step"])
