"""The one checkpoint scheme of every graftfx trainer (pretrain, stage 1, stage 2).

    ROOT/step-0000200/params.safetensors    tensors a trainer names (plain safetensors: other tools read them)
    ROOT/step-0000200/train.safetensors     nested state (optimizer, scheduler, RNG): tensors + JSON skeleton
    ROOT/step-0000200/state.json            the trainer's own record (step, config, ...)
    ROOT/step-0000200/complete.json         written last: every file of the folder with its size
    ROOT/latest.json                        {"step": 200, "folder": "step-0000200"}: for people and tools

Writing step N: a hidden temporary folder ``ROOT/.step-000000N.<pid>-<id>.tmp`` receives every
file (each one written to a temporary name, fsynced and renamed), then ``complete.json``; the
folder is fsynced and renamed to ``step-000000N`` in one step; then ``latest.json`` is replaced
atomically and folders beyond ``keep`` are pruned. A crash or a full disk at any point leaves
either no ``step-000000N`` at all or a complete one. A write that fails (a full disk, a
read-only folder) is one GraftError naming the step, the folder, the reason and the last good
checkpoint, which stays as it was.

Reading: the newest *complete* step folder, verified on the spot: its ``complete.json`` parses,
names this step, and every file it lists exists with the recorded size. Temporary folders are
never read; ``latest.json`` is not trusted (a crash between the rename and the pointer update
leaves it one checkpoint behind, and a missing or stale pointer costs nothing). One writer per
ROOT (per-rank runs give each rank its own ROOT).

Tests only: ``GRAFTFX_TEST_CHECKPOINT_PAUSE=STEP:POINT:MARKER`` makes the writer of step STEP
create the file MARKER and sleep at POINT (once: not when MARKER exists) (``files``: between the first and second file of the
step folder; ``pointer``: after the rename, before ``latest.json``), so a test can SIGKILL it
there.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graftfx.errors import GraftError
from graftfx.io import atomic_path, atomic_write_json, temp_name

from .nested import flatten, unflatten

POINTER = "latest.json"
RECORD = "complete.json"
META = "state.json"
FORMAT = "graftfx-checkpoint/1"
STATE_KEY = "graftfx.state"          # safetensors metadata key holding a nested state's skeleton
PAUSE_ENV = "GRAFTFX_TEST_CHECKPOINT_PAUSE"
_STEP = re.compile(r"^step-(\d+)$")
_TEMP = re.compile(r"^\.step-\d+\..*\.(tmp|old)$")


class CheckpointWriteError(GraftError, OSError):
    """A checkpoint that could not be written (full disk, read-only folder): one line for the user
    (a GraftError), and still the OSError it is for callers that catch those."""


def step_folder_name(step: int) -> str:
    return f"step-{step:07d}"


@dataclass
class Checkpoint:
    """One complete step folder; files load on demand."""

    step: int
    folder: Path
    meta: dict
    files: dict[str, int] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """The file ``name`` (``params`` -> ``params.safetensors``; ``state.json`` as given)."""
        filename = name if "." in name else f"{name}.safetensors"
        if filename not in self.files:
            raise GraftError(f"checkpoint {self.folder} has no {filename} (it holds {', '.join(sorted(self.files))}); "
                             "fix: resume with the same kind of run that wrote it")
        return self.folder / filename

    def has(self, name: str) -> bool:
        return (name if "." in name else f"{name}.safetensors") in self.files

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A flat tensor file, as written (CPU tensors)."""
        from safetensors.torch import load_file

        return load_file(str(self.path(name)))

    def state(self, name: str) -> Any:
        """A nested state file, rebuilt (optimizer/scheduler state dicts, RNG states...)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.path(name)
        with safe_open(str(path), framework="pt") as f:
            skeleton = (f.metadata() or {}).get(STATE_KEY)
        if skeleton is None:
            raise GraftError(f"{path} holds plain tensors, not a nested training state; fix: read it with tensors()")
        return unflatten(load_file(str(path)), skeleton)


class CheckpointStore:
    """The step checkpoints under ``root``; ``keep`` complete ones stay on disk (newest)."""

    def __init__(self, root, keep: int = 2):
        if keep < 1:
            raise GraftError(f"checkpoints to keep must be >= 1, got {keep}; fix: pass e.g. --keep 2")
        self.root = Path(root)
        self.keep = keep

    # ---- writing -------------------------------------------------------------------------------
    def save(self, step: int, *, tensors: dict[str, dict[str, torch.Tensor]] | None = None,
             states: dict[str, Any] | None = None, meta: dict | None = None) -> Path:
        """Write checkpoint ``step``: each ``tensors[name]`` as ``name.safetensors`` (flat),
        each ``states[name]`` as ``name.safetensors`` (nested, with its skeleton), ``meta`` as
        ``state.json``; returns the step folder once it is complete and in place."""
        tensors, states = dict(tensors or {}), dict(states or {})
        clash = set(tensors) & set(states)
        if clash:
            raise ValueError(f"checkpoint file name(s) {sorted(clash)} given as both tensors and states")
        try:
            return self._save(step, tensors, states, meta)
        except OSError as e:
            raise CheckpointWriteError(f"checkpoint step {step} could not be written to {self.root}: {_reason(e)}; "
                             f"{self.describe_latest()}; fix: free space (or use another --out) and rerun with "
                             "--resume") from None

    def _save(self, step: int, tensors: dict, states: dict, meta: dict | None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = step_folder_name(step)
        final = self.root / name
        tmp = temp_name(final)
        try:
            tmp.mkdir()
            sizes: dict[str, int] = {}
            parts = [(n, t, None) for n, t in tensors.items()] + [(n, *flatten(s)) for n, s in states.items()]
            for i, (part, flat, skeleton) in enumerate(parts):
                filename = f"{part}.safetensors"
                _write_safetensors(tmp / filename, flat, {STATE_KEY: skeleton} if skeleton is not None else None)
                sizes[filename] = (tmp / filename).stat().st_size
                if i == 0:
                    _pause(step, "files")
            atomic_write_json(tmp / META, {**(meta or {}), "step": step})
            sizes[META] = (tmp / META).stat().st_size
            atomic_write_json(tmp / RECORD, {"format": FORMAT, "step": step, "files": sizes})
            _fsync_dir(tmp)
            old = None
            if final.exists():  # this step was written before (a rerun from an older checkpoint)
                old = final.with_name(tmp.name[:-len(".tmp")] + ".old")
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _pause(step, "pointer")
        atomic_write_json(self.root / POINTER, {"step": step, "folder": name})
        _fsync_dir(self.root)
        self._prune(step)
        return final

    def _prune(self, newest: int) -> None:
        """Keep the ``keep`` newest complete step folders (``newest`` among them); drop the rest,
        incomplete step folders and temporary folders crashed writers left."""
        complete = [s for s, _ in self._step_folders() if self._verify(s) is not None]
        kept = set(sorted(complete, reverse=True)[: self.keep]) | {newest}
        for step, folder in self._step_folders():
            if step not in kept:
                shutil.rmtree(folder, ignore_errors=True)
        for entry in self._temp_folders():
            shutil.rmtree(entry, ignore_errors=True)

    def clear(self) -> None:
        """Remove every checkpoint under ``root`` (a fresh run in an old folder)."""
        for _, folder in self._step_folders():
            shutil.rmtree(folder, ignore_errors=True)
        for entry in self._temp_folders():
            shutil.rmtree(entry, ignore_errors=True)
        (self.root / POINTER).unlink(missing_ok=True)

    # ---- reading -------------------------------------------------------------------------------
    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        for step, _ in sorted(self._step_folders(), reverse=True):
            ckpt = self._verify(step)
            if ckpt is not None:
                return ckpt
        return None

    def require(self, what: str = "--resume",
                fix: str = "run without --resume to start, or pass the --out of an earlier run") -> Checkpoint:
        """``latest()``, or a one-line GraftError naming the folder and the fix when there is none."""
        ckpt = self.latest()
        if ckpt is not None:
            return ckpt
        broken = [f.name for _, f in sorted(self._step_folders())]
        detail = f" ({len(broken)} incomplete step folder(s) skipped: {', '.join(broken)})" if broken else ""
        raise GraftError(f"{what}: no complete checkpoint in {self.root}{detail}; fix: {fix}")

    def at(self, step: int) -> Checkpoint | None:
        """The complete checkpoint of ``step``, or None."""
        return self._verify(step)

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return [s for s, _ in sorted(self._step_folders()) if self._verify(s) is not None]

    def describe_latest(self) -> str:
        """'the last good checkpoint (step N) is kept in FOLDER' or 'no checkpoint was written yet'."""
        ckpt = self.latest()
        if ckpt is None:
            return f"no checkpoint was written yet in {self.root}"
        return f"the last good checkpoint (step {ckpt.step}) is kept in {ckpt.folder}"

    def _step_folders(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            m = _STEP.match(entry.name)
            if m and entry.is_dir():
                out.append((int(m.group(1)), entry))
        return out

    def _temp_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [e for e in self.root.iterdir() if _TEMP.match(e.name) and e.is_dir()]

    def _verify(self, step: int) -> Checkpoint | None:
        """The checkpoint of ``step`` if its folder is complete, else None."""
        folder = self.root / step_folder_name(step)
        try:
            record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
            files = {str(k): int(v) for k, v in record["files"].items()}
            if record.get("format") != FORMAT or int(record["step"]) != step or META not in files:
                return None
            for filename, size in files.items():
                if (folder / filename).stat().st_size != size:
                    return None
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return Checkpoint(step, folder, meta, files)


def agreed_checkpoint(store: CheckpointStore, world: int, what: str) -> Checkpoint:
    """The checkpoint to resume from: the newest; under torchrun (collective: every rank calls
    it), the newest step every rank has (a rank killed mid-run may be one checkpoint behind)."""
    ckpt = store.require()
    if world == 1:
        return ckpt
    import torch.distributed as dist

    step = torch.tensor([ckpt.step], dtype=torch.long)
    dist.all_reduce(step, op=dist.ReduceOp.MIN)
    if int(step) == ckpt.step:
        return ckpt
    older = store.at(int(step))
    if older is None:
        raise GraftError(f"{what} resume: the ranks' newest common checkpoint is step {int(step)}, which "
                         f"{store.root} no longer holds (it has {store.steps()}); start again without --resume")
    return older


def checkpoint_file(path, name: str = "params.safetensors") -> Path:
    """``path`` itself when it is a file, else ``name`` in the newest complete checkpoint under
    the checkpoint folder ``path`` (for commands that take 'a checkpoint' from the user)."""
    path = Path(path)
    if path.is_file():
        return path
    ckpt = CheckpointStore(path).latest()
    if ckpt is None:
        raise GraftError(f"{path} is neither a file nor a folder holding a complete checkpoint; "
                         f"fix: pass a .safetensors file or a run's checkpoint folder")
    return ckpt.path(name)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """``tensors`` (CPU, contiguous, no two sharing memory) to ``path`` atomically and durably."""
    from safetensors.torch import save_file

    flat, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:  # safetensors refuses shared storage: store a copy
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        flat[k] = v
    from safetensors import SafetensorError

    with atomic_path(path) as tmp:
        try:
            save_file(flat, str(tmp), metadata=metadata)
        except SafetensorError as e:  # the Rust writer's I/O errors, as the OSError they are
            text = str(e)
            code = errno.ENOSPC if "No space left" in text or "os error 28" in text else errno.EIO
            raise OSError(code, os.strerror(code) if code == errno.ENOSPC else text, str(path)) from None
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")


def _fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` durable (renames and new files), where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pause(step: int, point: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    at, where, marker = spec.split(":", 2)
    if int(at) == step and where == point and not Path(marker).exists():   # once: a restarted run goes on
        Path(marker).write_text(f"{os.getpid()}\n", encoding="utf-8")
        time.sleep(600)
