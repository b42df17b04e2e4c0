"""The distillation job: plan -> splice -> teacher activations (cache or online) -> stage 1 ->
stage 2 -> export. ``graftfx distill``, the demo and the study all run it.

- ``run_distill(model, example_inputs, rules, ...)``: trace, select, then ``distill_plan``.
- ``distill_plan(plan, ...)``: for a caller that traced once already (the demo inspects and
  grafts the same trace; the study distils many plans of one trace against one shared cache).

Under ``torchrun`` (WORLD_SIZE > 1), stage 1 shards regions across ranks and stage 2 runs DDP
(or FSDP).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from graftfx.errors import GraftError
from graftfx.export.export import export_grafted, fingerprint, preflight
from graftfx.rules import load_rules
from graftfx.select.select import Plan, select
from graftfx.splice.splice import GraftedModule, splice
from graftfx.trace.tracer import trace

from .cache import ActivationCache, CacheSpec, OnlineTeacher, data_fingerprint, write_cache
from .calibration import CalibrationSet
from .record import Tap
from .stage1 import RegionJob, Stage1Config, merge_rank_checkpoints, train_stage1
from .stage2 import Stage2Config, apply_ema, has_checkpoint, train_stage2

STAGES = ("1", "2", "both")


@dataclass
class DistillSettings:
    stage: str = "both"
    cache: str | None = None          # cache folder; None with online=False -> <out>/cache
    online: bool = False
    samples: int = 1024               # calibration samples (the paper: 8,000)
    cache_dtype: str = "float16"      # the paper stores fp16
    shard_size: int = 256
    record_batch: int = 32
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    device: str = "cpu"
    export: bool = True               # write <out>/grafted (model.safetensors + graft.json)

    def __post_init__(self):
        from graftfx.limits import resolve_device

        for name in ("samples", "shard_size", "record_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GraftError(f"distill setting {name} must be an integer >= 1, got {value!r}")
        resolve_device(self.device, "device")
        if self.stage not in STAGES:
            raise GraftError(f"--stage {self.stage!r} is not one of {', '.join(STAGES)}")
        if self.online and self.cache:
            raise GraftError("--cache and --online exclude each other: pick one")


@dataclass
class DistillResult:
    grafted: GraftedModule
    out: Path
    stage1: dict | None = None
    stage2: dict | None = None
    export: Path | None = None


def _world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def run_distill(model, example_inputs, rules, latents: torch.Tensor, labels: torch.Tensor, out,
                settings: DistillSettings, **kw) -> DistillResult:
    """Trace ``model`` at ``example_inputs``, select with ``rules`` and distill (``distill_plan``)."""
    model = model.to(settings.device).eval()
    example_inputs = tuple(t.to(settings.device) if isinstance(t, torch.Tensor) else t for t in example_inputs)
    plan = select(trace(model, example_inputs), load_rules(rules))
    return distill_plan(plan, latents, labels, out, settings, **kw)


def distill_plan(plan: Plan, latents: torch.Tensor, labels: torch.Tensor, out, settings: DistillSettings, *,
                 cache=None, model_id: str = "", resume: bool = False,
                 progress: bool = True, log=print) -> DistillResult:
    """Splice ``plan`` and distill the result; everything lands in ``out``.

    ``cache``: a cache folder (or an opened ActivationCache) holding at least the plan's regions,
    recorded from the
    same trace, teacher, data and calibration seed (checked); default: ``settings.cache`` or
    ``out/cache``, written first (resumable), or the online teacher with ``settings.online``.
    """
    traced = plan.traced
    model = traced.model
    check_data(latents, labels, model)               # argument checks before anything is written or built
    preflight(plan)
    rank, world = _world()
    say = log if rank == 0 else (lambda *a, **k: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grafted = splice(plan)
    say(f"grafted {len(grafted.grafts)} regions: " + ", ".join(f"{g.region.path}->{g.operator}" for g in grafted.grafts))
    model_hash = fingerprint(model)
    result = DistillResult(grafted, out)
    if settings.stage in ("1", "both"):
        taps = [Tap.of(g.region) for g in grafted.grafts]
        seed = settings.stage1.seed
        calib = CalibrationSet(latents, labels, settings.samples, seed=seed)
        data_hash = data_fingerprint(latents, labels)
        if cache is not None:
            folder = cache.folder if isinstance(cache, ActivationCache) else Path(cache)
            source = ActivationCache(folder, taps=taps, model_hash=model_hash, data_hash=data_hash, seed=seed,
                                     samples=settings.samples)
            say(f"teacher activations: cache {folder} ({len(taps)} of its {len(source.index['regions'])} regions)")
        elif settings.online:
            source = OnlineTeacher(traced, taps, calib, settings.cache_dtype)
            say(f"teacher activations: online ({settings.samples} samples, {settings.cache_dtype})")
        else:
            folder = Path(settings.cache or out / "cache")
            spec = CacheSpec(settings.samples, settings.shard_size, settings.cache_dtype, seed, model_hash, data_hash)
            if rank == 0:
                write_cache(folder, traced, taps, calib, spec, batch_size=settings.record_batch, progress=progress,
                            log=say)
            _barrier(world)
            source = ActivationCache(folder, taps=taps, model_hash=model_hash, data_hash=data_hash, seed=seed,
                                     samples=settings.samples)
        jobs = [RegionJob(g.region.path, g.target, grafted.get_submodule(g.target), g.rule.effective_loss, g.region.kind)
                for g in grafted.grafts]
        result.stage1 = train_stage1(jobs, source, settings.stage1, out / "stage1", resume=resume, rank=rank,
                                     world=world, progress=progress)
        _barrier(world)
        if world > 1:  # every rank takes every region's trained weights
            merged = merge_rank_checkpoints(out / "stage1", world)
            grafted.load_state_dict({**grafted.state_dict(), **merged}, strict=True)
    if settings.stage in ("2", "both"):
        cfg = settings.stage2
        if cfg.num_classes == 1000 and hasattr(model, "config") and hasattr(model.config, "num_classes"):
            cfg.num_classes = model.config.num_classes
        teacher = model if cfg.objective != "diffusion" or cfg.train == "all" else None
        resume2 = resume and (settings.stage == "2" or has_checkpoint(out / "stage2"))  # stage 2 may not have begun
        result.stage2 = train_stage2(grafted, teacher, latents, labels, cfg, out / "stage2", resume=resume2, rank=rank,
                                     world=world, progress=progress)
        apply_ema(grafted, result.stage2["ema"])
    if rank == 0 and settings.export:
        metrics = {}
        if result.stage1:
            metrics["stage1_final_loss"] = result.stage1["losses"]
        if result.stage2:
            metrics["stage2_final_loss"] = result.stage2["loss"]
        settings_dict = {"stage": settings.stage, "samples": settings.samples, "cache_dtype": settings.cache_dtype,
                         "online": settings.online, "stage1": asdict(settings.stage1), "stage2": asdict(settings.stage2)}
        result.export = export_grafted(grafted, out / "grafted", base_id=model_id, base_hash=model_hash,
                                       settings=settings_dict, metrics=metrics)
        say(f"exported {result.export}")
    _barrier(world)
    return result


def load_data(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and labels: ``digits`` (the bundled digits, train split) or a file holding tensors
    ``latents`` (N, C, H, W) and ``labels`` (N,) (.safetensors, or .pt read with weights_only).
    Dtypes, ranks, lengths and finiteness are checked here; the fit to a model by ``check_data``."""
    if spec == "digits":
        from graftfx.data import digits_split

        (x, y), _ = digits_split()
        return x, y
    if not isinstance(spec, str) or not spec.strip():
        raise GraftError("--data is empty; give 'digits' or a .safetensors/.pt file with latents and labels")
    path = Path(spec)
    if not path.is_file():
        raise GraftError(f"data {spec!r} is neither 'digits' nor a file; give a .safetensors/.pt with latents and labels")
    from graftfx.models.load import read_state_dict

    blob = read_state_dict(path, what="data file")
    missing = [k for k in ("latents", "labels") if k not in blob]
    if missing:
        raise GraftError(f"data file {path} lacks tensor(s) {', '.join(missing)}; it needs 'latents' (N, C, H, W) and "
                         f"'labels' (N,) (it has {', '.join(list(blob)[:4])})")
    x, y = blob["latents"], blob["labels"]
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise GraftError(f"data file {path}: latents are {str(x.dtype).replace('torch.', '')}; they must be floating "
                         "point (float32/float16/bfloat16)")
    if x.ndim != 4 or x.shape[0] < 1 or 0 in x.shape:
        raise GraftError(f"data file {path}: latents have shape {list(x.shape)}; they must be (N, C, H, W) with N >= 1")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.ndim != 1:
        raise GraftError(f"data file {path}: labels are {str(y.dtype).replace('torch.', '')} of shape {list(y.shape)}; "
                         "they must be integer class indices of shape (N,)")
    if len(y) != len(x):
        raise GraftError(f"data file {path}: {len(x)} latents but {len(y)} labels; one label per latent")
    if not bool(torch.isfinite(x).all()):
        raise GraftError(f"data file {path}: latents hold NaN or infinite values; clean the data")
    return x.float(), y.long()


def check_data(latents: torch.Tensor, labels: torch.Tensor, model, where: str = "--data") -> None:
    """Latents shaped like the model's input, labels within its classes (DiT-style ``config``)."""
    cfg = getattr(model, "config", None)
    need = ("in_channels", "input_size", "num_classes")
    if cfg is None or not all(isinstance(getattr(cfg, k, None), int) for k in need):
        return
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(latents.shape[1:]) != want:
        raise GraftError(f"{where}: latents are {list(latents.shape[1:])} per sample but the model takes {list(want)}; "
                         "give the latents of this model's data")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
        raise GraftError(f"{where}: labels range {int(labels.min())}..{int(labels.max())}, but the model has "
                         f"{cfg.num_classes} classes (0..{cfg.num_classes - 1})")
