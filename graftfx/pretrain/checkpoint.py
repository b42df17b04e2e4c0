"""Training checkpoints: one folder per saved step, swapped in whole.

    OUT/checkpoints/step-0001000/weights.safetensors    model.<key> and ema.<key> (DiT key layout)
    OUT/checkpoints/step-0001000/optimizer.safetensors  AdamW state, "<param index>.<exp_avg|exp_avg_sq|step>"
    OUT/checkpoints/step-0001000/state.json             step, settings, wall time, the runs so far
    OUT/checkpoints/latest.json                         {"step": 1000, "folder": "step-0001000"}

A step folder is written under a temporary name (each file itself atomically) and renamed once
complete; ``latest.json`` is replaced last, so it always names a complete checkpoint. Older
step folders beyond ``keep`` are then removed.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from graftfx.errors import GraftError

from graftfx.io import atomic_save_safetensors, atomic_write_json, temp_name

LATEST = "latest.json"


@dataclass
class Checkpoint:
    step: int
    folder: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer_state: dict[int, dict[str, torch.Tensor]]
    state: dict


def step_folder_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(root, step: int, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict, keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` under ``root`` and point ``latest.json`` at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = step_folder_name(step)
    tmp = temp_name(root / name)
    try:
        tmp.mkdir()
        weights = {f"model.{k}": v for k, v in model.state_dict().items()}
        weights.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        atomic_save_safetensors(tmp / "weights.safetensors", weights, {"step": str(step)})
        atomic_save_safetensors(tmp / "optimizer.safetensors", _flatten_optimizer(optimizer), {"step": str(step)})
        atomic_write_json(tmp / "state.json", {**state, "step": step})
        final = root / name
        if final.exists():  # a rerun from an older checkpoint reached this step again
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(root / LATEST, {"step": step, "folder": name})
    _prune(root, keep, name)
    return final


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for idx, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {idx}.{key} is a {type(value).__name__}, not a tensor")
            flat[f"{idx}.{key}"] = value
    return flat


def _prune(root: Path, keep: int, latest: str) -> None:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    older = [f for f in folders if f != latest]
    for name in older[: max(0, len(folders) - max(keep, 1))]:
        shutil.rmtree(root / name, ignore_errors=True)


def latest_step(root) -> int | None:
    """The step ``latest.json`` names, or None when ``root`` holds no checkpoint."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    return int(json.loads(path.read_text(encoding="utf-8"))["step"])


def load_checkpoint(root) -> Checkpoint:
    """The checkpoint ``latest.json`` names; a GraftError when there is none or it is incomplete."""
    from safetensors.torch import load_file

    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        raise GraftError(f"--resume: no checkpoint in {root} ({LATEST} not found); "
                         "fix: run without --resume to start, or pass the --out of an earlier run")
    info = json.loads(pointer.read_text(encoding="utf-8"))
    folder = root / info["folder"]
    files = [folder / n for n in ("weights.safetensors", "optimizer.safetensors", "state.json")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise GraftError(f"--resume: checkpoint {folder} is incomplete (missing {', '.join(missing)}); "
                         f"fix: point {pointer} at a complete step folder or start a new run")
    weights = load_file(str(files[0]))
    model = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    ema = {k[len("ema."):]: v for k, v in weights.items() if k.startswith("ema.")}
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(files[1])).items():
        idx, name = key.split(".", 1)
        optimizer_state.setdefault(int(idx), {})[name] = value
    state = json.loads(files[2].read_text(encoding="utf-8"))
    return Checkpoint(int(info["step"]), folder, model, ema, optimizer_state, state)
