"""The distillation job: plan -> splice -> teacher activations (cache or online) -> stage 1 ->
stage 2 -> export. ``graftfx distill``, the demo and the study all run it.

- ``run_distill(model, example_inputs, rules, ...)``: trace, select, then ``distill_plan``.
- ``distill_plan(plan, ...)``: for a caller that traced once already (the demo inspects and
  grafts the same trace; the study distils many plans of one trace against one shared cache).

Under ``torchrun`` (WORLD_SIZE > 1), stage 1 shards regions across ranks and stage 2 runs DDP
(or FSDP).
"""
from __future__ import annotations

import math
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

from graftfx.training import CheckpointStore

from .assign import assign, region_costs
from .cache import INDEX as CACHE_INDEX
from .cache import (DTYPES, ActivationCache, CacheSpec, OnlineTeacher, ShardedCache, data_fingerprint, field_shapes,
                    find_cached, write_cache)
from graftfx.models.adapters import ADAPTERS, ModelAdapter, NoiseSchedule, ReadyInputs, adapter_for

from .calibration import CalibrationSet, ReadyCalibration
from .record import Tap
from .stage1 import RegionJob, Stage1Config, train_stage1
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
        import datetime

        # GRAFTFX_DIST_TIMEOUT (seconds): how long a collective (and the first connect) may wait for a
        # peer; a dead peer then fails the run, and torchrun --max-restarts starts it again
        timeout = datetime.timedelta(seconds=float(os.environ.get("GRAFTFX_DIST_TIMEOUT", "1800")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and attempt != "0":
            # a restarted round shares torchrun's store with the round before: keys of its own, or the
            # ranks would read the dead round's addresses (gloo: "connection refused")
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                                  timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"graftfx/attempt-{attempt}", store),
                                    rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def run_distill(model, example_inputs, rules, latents: torch.Tensor, labels: torch.Tensor | None, out,
                settings: DistillSettings, *, example_kwargs: dict | None = None, **kw) -> DistillResult:
    """Trace ``model`` at ``example_inputs`` (and ``example_kwargs``), select with ``rules`` and
    distill (``distill_plan``). Keyword models (diffusers): trace at their adapter's example,
    ``adapter_for(model).example(model, 2)``, which calls the model as its pipeline does."""
    model = model.to(settings.device).eval()
    move = lambda t: t.to(settings.device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    example_inputs = tuple(move(t) for t in example_inputs)
    example_kwargs = {k: move(v) for k, v in (example_kwargs or {}).items()}
    plan = select(trace(model, example_inputs, example_kwargs), load_rules(rules))
    return distill_plan(plan, latents, labels, out, settings, **kw)


def distill_plan(plan: Plan, latents: torch.Tensor, labels: torch.Tensor | None, out, settings: DistillSettings, *,
                 conditioning: dict[str, torch.Tensor] | None = None, schedule: NoiseSchedule | None = None,
                 adapter: ModelAdapter | None = None, ready: ReadyInputs | None = None,
                 unconditional: dict[str, torch.Tensor] | None = None,
                 cache=None, model_id: str = "", resume: bool = False,
                 progress: bool = True, log=print) -> DistillResult:
    """Splice ``plan`` and distill the result; everything lands in ``out``.

    The data: clean ``latents`` (N, C, H, W) with their conditioning — ``labels`` (N,) for
    class-conditional models, ``conditioning`` (``embeddings`` (N, S, D), ``mask`` (N, S)) for
    text-conditional ones, with ``unconditional`` (the empty caption's ``embeddings`` (S, D) and
    ``mask`` (S,)) for stage 2's conditioning dropout — noised by ``schedule`` (default: the
    model's, DDPM linear 1000 steps); the model is called through ``adapter`` (default: ``adapter_for(model)``). Or
    ``ready``: calibration inputs prepared by the user (stage 1 only).

    ``cache``: a cache folder (or an opened ActivationCache) holding at least the plan's regions,
    recorded from the
    same trace, teacher, data and calibration seed (checked); default: ``settings.cache`` or
    ``out/cache``, written first (resumable), or the online teacher with ``settings.online``.
    """
    traced = plan.traced
    model = traced.model
    conditioning = dict(conditioning or {})
    if adapter is None and ready is None and (traced.kwargs or _has_adapter(model)):
        adapter = adapter_for(model)     # a keyword model without one: the error says what to do
    if ready is not None and settings.stage != "1":
        raise GraftError("ready calibration inputs (--inputs) feed stage 1 only; pass --stage 1, or give data "
                         "latents and conditioning for stage 2")
    if ready is None:
        check_data(latents, labels, model)           # argument checks before anything is written or built
        check_conditioning(latents, labels, conditioning, adapter)
        check_resolution(latents, traced)
    preflight(plan)
    rank, world = _world()
    out = Path(out)
    resume = resume or _restarted(out, world)
    say = log if rank == 0 else (lambda *a, **k: None)
    out.mkdir(parents=True, exist_ok=True)
    grafted = splice(plan)
    say(f"grafted {len(grafted.grafts)} regions: " + ", ".join(f"{g.region.path}->{g.operator}" for g in grafted.grafts))
    model_hash = fingerprint(model)
    result = DistillResult(grafted, out)
    if settings.stage in ("1", "both") and not grafted.grafts:
        say("stage 1: nothing to train (the rules only drop blocks); stage 2 finetunes the shallower model")
    if settings.stage in ("1", "both") and grafted.grafts:
        taps = [Tap.of(g.region) for g in grafted.grafts]
        seed = settings.stage1.seed
        if ready is not None:
            calib = ReadyCalibration(ready, settings.samples, seed)
            data_hash = data_fingerprint(*ready.tensors.values())
        else:
            calib = CalibrationSet(latents, labels, settings.samples, seed=seed, conditioning=conditioning,
                                   schedule=schedule, adapter=adapter, model=model)
            data_hash = data_fingerprint(*[t for t in (latents, labels, *conditioning.values()) if t is not None])
        assignment, groups = None, None
        if world > 1:   # regions to ranks by cost; groups of ranks for regions when ranks outnumber them
            shapes = field_shapes(traced, taps)
            size = DTYPES[settings.cache_dtype].itemsize
            bytes_per = {p: size * sum(math.prod(v) for v in f.values()) for p, f in shapes.items()}
            assignment = assign(region_costs(grafted, bytes_per), world)
            groups = {p: dist.new_group(ranks) for p, ranks in assignment.groups.items() if len(ranks) > 1}
            say("stage 1 ranks: " + "; ".join(f"{p} -> {r}" for p, r in assignment.groups.items()))
        mine = [t for t in taps if assignment is None or rank in assignment.groups[t.path]]
        expect = dict(model_hash=model_hash, data_hash=data_hash, seed=seed, samples=settings.samples)
        if cache is not None:
            folder = cache.folder if isinstance(cache, ActivationCache) else Path(cache)
            source = ActivationCache(folder, taps=taps, **expect)
            say(f"teacher activations: cache {folder} ({len(taps)} of its {len(source.index['regions'])} regions)")
        elif settings.online:
            source = OnlineTeacher(traced, mine, calib, settings.cache_dtype)
            say(f"teacher activations: online ({settings.samples} samples, {settings.cache_dtype})")
        else:
            root = Path(settings.cache.replace("{rank}", str(rank)) if settings.cache else out / "cache")
            spec = CacheSpec(settings.samples, settings.shard_size, settings.cache_dtype, seed, model_hash, data_hash)
            if world == 1:
                # a root of rank folders (an earlier run at another world size) may hold every region
                of_ranks = root.is_dir() and not (root / CACHE_INDEX).exists()
                found = find_cached(root, taps, **expect) if of_ranks else {}
                if len(found) == len(taps):
                    source = ShardedCache(found)
                    folders = len({id(c) for c in found.values()})
                    say(f"teacher activations: reused from {folders} folder(s) under {root}")
                else:
                    write_cache(root, traced, taps, calib, spec, batch_size=settings.record_batch, progress=progress,
                                log=say)
                    source = ActivationCache(root, taps=taps, **expect)
            else:   # every rank records only its regions, into its own folder (node-local is fine)
                source = ShardedCache(_rank_cache(root, traced, mine, calib, spec, expect, rank, world, settings,
                                                  progress, log))
        jobs = [RegionJob(g.region.path, g.target, grafted.get_submodule(g.target), g.rule.effective_loss, g.region.kind)
                for g in grafted.grafts]
        result.stage1 = train_stage1(jobs, source, settings.stage1, out / "stage1", resume=resume, rank=rank,
                                     world=world, progress=progress, assignment=assignment, groups=groups)
        if world > 1:  # every rank takes every region's trained weights, from a rank that trained it
            merged = gather_trained(grafted, assignment, rank)
            grafted.load_state_dict({**grafted.state_dict(), **merged}, strict=True)
    if settings.stage in ("2", "both"):
        cfg = settings.stage2
        if cfg.num_classes == 1000 and hasattr(model, "config") and hasattr(model.config, "num_classes"):
            cfg.num_classes = model.config.num_classes
        if cfg.num_classes == 1000 and hasattr(model, "config") and hasattr(model.config, "num_embeds_ada_norm"):
            cfg.num_classes = int(model.config.num_embeds_ada_norm or 1000)
        teacher = model if cfg.objective != "diffusion" or cfg.train == "all" else None
        resume2 = resume and (settings.stage == "2"   # stage 2 may not have begun
                              or has_checkpoint(out / "stage2", rank, world, cfg.parallel))
        result.stage2 = train_stage2(grafted, teacher, latents, labels, cfg, out / "stage2", resume=resume2, rank=rank,
                                     world=world, progress=progress, adapter=adapter, base=model,
                                     conditioning=conditioning, schedule=schedule, unconditional=unconditional,
                                     log=say)
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


def plan_distill(model, example_inputs, example_kwargs, rules, settings: DistillSettings, world: int, *,
                 model_id: str = "") -> dict:
    """What a distill run of ``model`` with ``rules`` would spend at ``world`` ranks
    (``graftfx.distill.assign.plan_run``), with its text (``"text"``). Runs nothing."""
    from .assign import format_plan, plan_run

    traced = trace(model, example_inputs, example_kwargs)
    plan = select(traced, load_rules(rules))
    grafted = splice(plan)
    taps = [Tap.of(g.region) for g in grafted.grafts]
    out = plan_run(traced, grafted, taps, settings.samples, world, cache_dtype=settings.cache_dtype,
                   shard_size=settings.shard_size, record_batch=settings.record_batch,
                   train_batch=settings.stage1.batch_size)
    out["text"] = format_plan(out, model_id)
    return out


def _rank_cache(root: Path, traced, taps, calib, spec, expect, rank: int, world: int, settings, progress,
                log) -> dict:
    """This rank's regions: reused from any complete cache folder under ``root`` it can see (an
    earlier run's, of any world size), the rest recorded into ``root/rankR-of-W``."""
    found = find_cached(root, taps, **expect)
    missing = [t for t in taps if t.path not in found]
    if missing:
        folder = root / f"rank{rank}-of-{world}"
        write_cache(folder, traced, missing, calib, spec, batch_size=settings.record_batch,
                    progress=progress and rank == 0, log=log if rank == 0 else (lambda *a, **k: None),
                    writer={"rank": rank, "world": world})
        cache = ActivationCache(folder, taps=missing, **expect)
        found.update({t.path: cache for t in missing})
    return found


def gather_trained(grafted, assignment, rank: int) -> dict[str, torch.Tensor]:
    """Every region's trained weights on every rank, broadcast by the first rank of its group
    (collectives: no file every rank must see)."""
    merged: dict[str, torch.Tensor] = {}
    for g in grafted.grafts:
        leader = assignment.groups[g.region.path][0]
        module = grafted.get_submodule(g.target)
        box = [{k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == leader else None]
        dist.broadcast_object_list(box, src=leader)
        merged.update({f"{g.target}.{k}": v for k, v in box[0].items()})
    return merged


def _restarted(out: Path, world: int) -> bool:
    """Under ``torchrun --max-restarts``, a restarted run resumes from its checkpoints when every
    rank has one (else every rank starts the stage again: the same result, later)."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) < 1:
        return False
    from .stage1 import checkpoint_root

    rank = dist.get_rank() if world > 1 else 0
    have = torch.tensor([int(CheckpointStore(checkpoint_root(out / "stage1", rank, world)).latest() is not None)])
    if world > 1:
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
    return bool(have.item())


def load_data(spec: str, *, labels: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents and labels: ``digits`` (the bundled digits, train split), a folder written by
    ``graftfx data latents``, or a file holding tensors ``latents`` (N, C, H, W) and ``labels``
    (N,) (.safetensors, or .pt read with weights_only). ``labels=False`` (text-conditioned
    models): labels are not needed (None when the data has none).
    Dtypes, ranks, lengths and finiteness are checked here; the fit to a model by ``check_data``."""
    if spec == "digits":
        from graftfx.data import digits_split

        (x, y), _ = digits_split()
        return x, y
    if not isinstance(spec, str) or not spec.strip():
        raise GraftError("--data is empty; give 'digits' or a .safetensors/.pt file with latents and labels")
    path = Path(spec)
    if path.is_dir():
        from graftfx.data.encode import load_latents

        x, y = load_latents(path)
        return x.float(), (y.long() if y is not None else None)
    if not path.is_file():
        raise GraftError(f"data {spec!r} is neither 'digits' nor a file; give a .safetensors/.pt with latents and labels")
    from graftfx.models.load import read_state_dict

    blob = read_state_dict(path, what="data file")
    if not labels and "labels" not in blob:
        blob = {**blob, "labels": None}
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
    if y is None:
        if not bool(torch.isfinite(x).all()):
            raise GraftError(f"data file {path}: latents hold NaN or infinite values; clean the data")
        return x.float(), None
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.ndim != 1:
        raise GraftError(f"data file {path}: labels are {str(y.dtype).replace('torch.', '')} of shape {list(y.shape)}; "
                         "they must be integer class indices of shape (N,)")
    if len(y) != len(x):
        raise GraftError(f"data file {path}: {len(x)} latents but {len(y)} labels; one label per latent")
    if not bool(torch.isfinite(x).all()):
        raise GraftError(f"data file {path}: latents hold NaN or infinite values; clean the data")
    return x.float(), y.long()


def _has_adapter(model) -> bool:
    return any(c.__name__ in ADAPTERS for c in type(model).__mro__)


def check_resolution(latents: torch.Tensor, traced, where: str = "--data") -> None:
    """The latents have the shape the graph was traced at (only the batch is dynamic)."""
    x = traced.kwargs.get("hidden_states", traced.args[0] if traced.args else None)
    if isinstance(x, torch.Tensor) and x.ndim == latents.ndim and tuple(x.shape[1:]) != tuple(latents.shape[1:]):
        raise GraftError(f"{where}: latents are {list(latents.shape[1:])} per sample but the model was traced at "
                         f"{list(x.shape[1:])}; trace at the data's resolution (graftfx distill does) or give "
                         "latents of that size")


def check_conditioning(latents: torch.Tensor, labels, conditioning: dict, adapter, where: str = "--data") -> None:
    """The conditioning the model's adapter needs is there, one row per latent."""
    need = adapter.conditioning if adapter is not None else ("labels",)
    have = {**({"labels": labels} if labels is not None else {}), **conditioning}
    missing = [k for k in need if k not in have]
    if missing:
        what = {"labels": "class labels (--data with labels)", "embeddings": "caption embeddings (--captions)",
                "mask": "caption masks (--captions)"}
        raise GraftError(f"{where}: this model needs {', '.join(what.get(k, k) for k in missing)}; "
                         "prepare them with graftfx data")
    for k, v in have.items():
        if len(v) != len(latents):
            raise GraftError(f"{where}: {len(latents)} latents but {len(v)} rows of {k}; one per latent")


def check_data(latents: torch.Tensor, labels: torch.Tensor | None, model, where: str = "--data") -> None:
    """Latents shaped like the model's input, labels within its classes (DiT-style ``config``)."""
    cfg = getattr(model, "config", None)
    need = ("in_channels", "input_size", "num_classes")
    if cfg is None or not all(isinstance(getattr(cfg, k, None), int) for k in need):
        return
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(latents.shape[1:]) != want:
        raise GraftError(f"{where}: latents are {list(latents.shape[1:])} per sample but the model takes {list(want)}; "
                         "give the latents of this model's data")
    if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
        raise GraftError(f"{where}: labels range {int(labels.min())}..{int(labels.max())}, but the model has "
                         f"{cfg.num_classes} classes (0..{cfg.num_classes - 1})")
