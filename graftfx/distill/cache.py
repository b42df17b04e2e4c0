"""The teacher activation cache: safetensors shards per region, an index, memory-mapped reads.

Layout of a cache folder::

    index.json                      samples, shard size, dtype, calibration seed, the teacher's
                                    weight hash and the data's hash; per region: folder, tap
                                    (the graph nodes recorded) and field shapes; per shard: sha256
    r000/shard-00000.safetensors    tensors "input", "output" (and "context", "in:mask", ...,
                                    "out:context": the region's per-sample extras), rows = samples
    r000/constants.safetensors      extra inputs that are the same for every sample (a
                                    relative-position bias, rotary tables), once

What a cache holds depends on the teacher's weights, the data, the calibration seed and count,
and the graph nodes each region's input and output are read at, never on the rules: one cache
can feed every rule set whose regions it holds (a study records each pattern's regions once).

Every file is written to a temporary name and renamed; the index is rewritten after each
shard, so an interrupted run leaves no half shard and a rerun continues where it stopped. A full
disk is a one-line error naming the file; the shards written so far stay and a rerun continues.

One writer at a time: ``write_cache`` holds an exclusive lock (``flock`` on ``.lock``, which names
the holder's pid, host and start time; the kernel releases it when the holder exits, however it
exits, so a lock is never stale). A second run on the same folder waits for the first, then
finds the shards written (same settings) or is told the cache was written with other settings.
Reads map shards with numpy (no full load into RAM); each shard's checksum and shapes, and the
index's hashes, seed and taps against what the run asks for, are checked before a byte is used.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import math
import mmap
import os
import shutil
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from graftfx.errors import GraftError
from graftfx.io import atomic_path, atomic_write_json, file_sha256, test_pause

from .calibration import CalibrationSet
from .record import Tap, record

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.bool: "BOOL", torch.int64: "I64",
       torch.int32: "I32"}
_NP = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "BOOL": np.bool_, "I64": np.int64, "I32": np.int32}
_TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "BOOL": torch.bool, "I64": torch.int64,
          "I32": torch.int32}
CONSTANTS = "constants.safetensors"


def stored(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A recorded value in the cache's storage dtype (masks and integer tensors keep theirs)."""
    if value.is_floating_point():
        return value.to(dtype)
    return value if value.dtype in _ST else value.to(torch.int64)
INDEX = "index.json"
LOCK = ".lock"
FORMAT = 2
# Tests only: "K:MARKER" makes the writer create MARKER and sleep after the first file of shard K
# (before the others and before the index names it), so a test can SIGKILL it there.
PAUSE_ENV = "GRAFTFX_TEST_CACHE_PAUSE"


# ---------------------------------------------------------------------------------------------
# small safetensors writer/reader (the format: u64 header length, JSON header, raw data)
# ---------------------------------------------------------------------------------------------

def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` as one safetensors file atomically; return its sha256."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        array = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        raw = memoryview(array).cast("B")  # the tensor's own bytes: no copy
        header[name] = {"dtype": _ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + raw.nbytes]}
        offset += raw.nbytes
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    chunks = (struct.pack("<Q", len(head)), head, *blobs)
    digest = hashlib.sha256()
    hasher = threading.Thread(target=lambda: [digest.update(c) for c in chunks])  # sha256 releases the GIL
    hasher.start()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    finally:
        hasher.join()
    return digest.hexdigest()


class Shard:
    """A memory-mapped safetensors file: ``rows(name, idx)`` reads only the rows asked for."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.base = 8 + n

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def rows(self, name: str, idx: np.ndarray) -> torch.Tensor:
        return _as_torch(self.rows_np(name, idx), self.header[name]["dtype"])

    def full(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (small ones: a region's constants)."""
        meta = self.header[name]
        with open(self.path, "rb") as f:
            f.seek(self.base + meta["data_offsets"][0])
            raw = f.read(meta["data_offsets"][1] - meta["data_offsets"][0])
        array = np.frombuffer(raw, dtype=_NP[meta["dtype"]]).reshape(meta["shape"]).copy()
        return _as_torch(array, meta["dtype"])

    def rows_np(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (sorted ascending reads best) of tensor ``name``, copied out of a mapping
        that is closed again right away: the process never holds more than one batch of it."""
        meta = self.header[name]
        start = self.base + meta["data_offsets"][0]
        mapped = np.memmap(self.path, dtype=_NP[meta["dtype"]], mode="r", offset=start, shape=tuple(meta["shape"]))
        _prefetch(mapped, start, idx)
        out = np.ascontiguousarray(mapped[idx])
        del mapped
        return out


def _as_torch(array: np.ndarray, st_dtype: str) -> torch.Tensor:
    out = torch.from_numpy(array)
    return out.view(torch.bfloat16) if st_dtype == "BF16" else out


def _prefetch(mapped: np.memmap, start: int, idx: np.ndarray) -> None:
    """Ask the kernel to read every wanted row now (one large request each), instead of faulting
    them in page by page during the copy."""
    mm = getattr(mapped, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not len(idx):
        return
    row = mapped.strides[0]
    base = start - start % mmap.ALLOCATIONGRANULARITY  # where numpy's mapping begins in the file
    page = mmap.PAGESIZE
    for i in np.unique(idx):
        lo = start - base + int(i) * row
        aligned = lo - lo % page
        try:
            mm.madvise(mmap.MADV_WILLNEED, aligned, lo + row - aligned)
        except (OSError, ValueError):
            return


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

@dataclass
class CacheSpec:
    """What a cache is recorded with; a rerun or a reader with another value is refused."""

    samples: int
    shard_size: int
    dtype: str
    seed: int                      # calibration seed: sample i is a function of (seed, i)
    model_hash: str                # the teacher's weights (graftfx.export.fingerprint)
    data_hash: str = ""            # the calibration data (data_fingerprint)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise GraftError(f"cache dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.shard_size < 1 or self.samples < 1:
            raise GraftError("cache samples and shard_size must be >= 1")

    @property
    def shards(self) -> int:
        return math.ceil(self.samples / self.shard_size)


def field_shapes(traced, taps: list[Tap]) -> dict[str, dict[str, list[int]]]:
    """Per-sample shapes of each region's fields, from the traced example shapes."""
    from graftfx.trace.tracer import SHAPE

    nodes = {n.name: n for n in traced.graph.nodes}
    return {t.path: {k: list(nodes[v].meta[SHAPE][1:]) for k, v in t.fields().items()} for t in taps}


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' shapes, dtypes and bytes (the calibration data a cache was made from)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def tap_record(tap: Tap) -> dict:
    out = {"input": tap.input, "output": tap.output, "context": tap.context}
    if tap.extras:
        out["extras"] = {k: [n, k in tap.batched] for k, n in tap.extras}
    if tap.extra_outputs:
        out["extra_outputs"] = dict(tap.extra_outputs)
    return out


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def estimate_bytes(shapes: dict, spec: CacheSpec) -> int:
    per_sample = sum(math.prod(s) for fields in shapes.values() for s in fields.values())
    return per_sample * spec.samples * DTYPES[spec.dtype].itemsize


def write_cache(folder, traced, taps: list[Tap], calib: CalibrationSet, spec: CacheSpec, *,
                batch_size: int = 32, progress: bool = True, log=print, writer: dict | None = None) -> Path:
    """Record the teacher on ``calib`` into ``folder``; resumes an interrupted write. Holds the
    folder's lock for the whole write (a second writer waits). ``writer`` (``{"rank": r, "world":
    w}`` under torchrun) goes into the index as a record of who wrote it; readers do not check it,
    so a run of another world size reuses the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GraftError(f"cache folder {folder} cannot be created: {e.strerror or e}; give another --cache") from None
    with cache_lock(folder, log):
        return _write_cache(folder, traced, taps, calib, spec, batch_size=batch_size, progress=progress, log=log,
                            writer=writer)


@contextlib.contextmanager
def cache_lock(folder: Path, log=print, poll: float = 0.5):
    """Hold ``folder/.lock`` exclusively (``fcntl.flock``); while another process holds it, say who
    (pid, host, since when) once and wait. The kernel drops the lock of a process that exits."""
    import fcntl

    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not told:
                log(f"cache {folder} is being written by {_holder(path)}; waiting for it to finish")
                told = True
            time.sleep(poll)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": datetime.datetime.now().isoformat(timespec="seconds")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _disk_error(e: OSError, folder: Path, what: Path) -> GraftError:
    reason = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return GraftError(f"cache {folder}: writing {what} failed: {reason}; the shards written so far are kept: free "
                      "space (or give another --cache) and rerun the same command to continue")


def _write_cache(folder: Path, traced, taps, calib, spec, *, batch_size, progress, log, writer=None) -> Path:
    shapes = field_shapes(traced, taps)
    need = estimate_bytes(shapes, spec)
    index = _open_index(folder, spec, taps, shapes)
    if writer is not None:
        index.setdefault("writer", dict(writer))
    done_bytes = sum((folder / s["file"]).stat().st_size for shards in index["shards"].values() for s in shards
                     if (folder / s["file"]).exists())
    free = shutil.disk_usage(folder).free
    log(f"cache: {len(taps)} regions x {spec.samples} samples ({spec.dtype}) = {human_bytes(need)} "
        f"in {folder} ({human_bytes(free)} free)")
    if need - done_bytes > free * 0.98:
        raise GraftError(f"cache needs {human_bytes(need - done_bytes)} more but {folder} has {human_bytes(free)} "
                         "free; use fewer --samples, --cache-dtype float16, another --cache folder, or --online")
    dtype = DTYPES[spec.dtype]
    todo = [k for k in range(spec.shards) if not _shard_done(folder, index, k)]
    bar = tqdm(total=len(todo), desc="teacher cache", unit="shard", disable=not progress)
    for k in todo:
        start, stop = k * spec.shard_size, min(spec.samples, (k + 1) * spec.shard_size)
        parts: dict[str, dict[str, list[torch.Tensor]]] = {t.path: {} for t in taps}
        constants: dict[str, dict[str, torch.Tensor]] = {t.path: {} for t in taps}
        for b in range(start, stop, batch_size):
            args, kwargs = calib.call(range(b, min(stop, b + batch_size)))
            recorded = record(traced, taps, args, kwargs)
            for tap in taps:
                fixed = tap.constants()
                for name, value in recorded[tap.path].items():
                    if name in fixed:
                        _keep_constant(constants[tap.path], name, stored(value, dtype), tap.path)
                    else:
                        parts[tap.path].setdefault(name, []).append(stored(value, dtype))
        for path, values in constants.items():
            if values:
                _write_constants(folder, index, path, values)
        for path, fields in parts.items():
            entry = index["regions"][path]
            rel = f"{entry['dir']}/shard-{k:05d}.safetensors"
            try:
                (folder / entry["dir"]).mkdir(exist_ok=True)
                sha = write_shard(folder / rel, {n: torch.cat(v) for n, v in fields.items()})
            except OSError as e:
                raise _disk_error(e, folder, folder / rel) from None
            _pause(k)
            shards = [s for s in index["shards"][path] if s["index"] != k]
            index["shards"][path] = sorted(shards + [{"index": k, "file": rel, "start": start, "count": stop - start,
                                                      "sha256": sha}], key=lambda s: s["index"])
        index["complete"] = all(_shard_done(folder, index, j) for j in range(spec.shards))
        _save_index(folder, index)
        bar.update(1)
    bar.close()
    index["complete"] = True
    _save_index(folder, index)
    return folder


def _keep_constant(kept: dict, name: str, value: torch.Tensor, path: str) -> None:
    if name not in kept:
        kept[name] = value
    elif kept[name].shape != value.shape or not torch.equal(kept[name], value):
        raise GraftError(f"region {path}: extra input {name[3:]!r} has no batch dimension but differs between "
                         "calibration batches; graftfx cannot cache it (use --online, or report the model)")


def _write_constants(folder: Path, index: dict, path: str, values: dict[str, torch.Tensor]) -> None:
    """A region's constant extras, once: the file of an earlier (interrupted) run must hold the same."""
    entry = index["regions"][path]
    rel = f"{entry['dir']}/{CONSTANTS}"
    have = index.setdefault("constants", {}).get(path)
    if have is not None and (folder / rel).exists():
        old = _read_constants(folder, path, have)
        for name, value in values.items():
            if name not in old or not torch.equal(old[name], value):
                raise GraftError(f"cache {folder}: region {path}'s {name[3:]!r} differs from the one recorded "
                                 "before; use a new --cache folder or delete this one")
        return
    try:
        (folder / entry["dir"]).mkdir(exist_ok=True)
        sha = write_shard(folder / rel, values)
    except OSError as e:
        raise _disk_error(e, folder, folder / rel) from None
    index["constants"][path] = {"file": rel, "sha256": sha}


def _read_constants(folder: Path, path: str, entry: dict) -> dict[str, torch.Tensor]:
    file = (folder / entry["file"]).resolve()
    if not file.is_relative_to(folder.resolve()) or not file.exists():
        raise GraftError(f"cache {folder}: the constants of {path} ({entry['file']}) are missing; record the cache "
                         "again")
    if file_sha256(file) != entry["sha256"]:
        raise GraftError(f"cache file {file} is corrupted (checksum mismatch); delete the cache folder and record "
                         "it again")
    shard = Shard(file)
    return {name: shard.full(name) for name in shard.header if name != "__metadata__"}


def _pause(k: int) -> None:
    test_pause(PAUSE_ENV, k)


def _save_index(folder: Path, index: dict) -> None:
    try:
        _write_json(folder / INDEX, index)
    except OSError as e:
        raise _disk_error(e, folder, folder / INDEX) from None


_KEYS = ("samples", "shard_size", "dtype", "seed", "model_hash", "data_hash")


def _open_index(folder: Path, spec: CacheSpec, taps: list[Tap], shapes: dict) -> dict:
    fresh = {"format": FORMAT, "samples": spec.samples, "shard_size": spec.shard_size, "dtype": spec.dtype,
             "seed": spec.seed, "model_hash": spec.model_hash, "data_hash": spec.data_hash, "complete": False,
             "regions": {t.path: {"dir": f"r{i:03d}", "tap": tap_record(t), "fields": shapes[t.path]}
                         for i, t in enumerate(taps)},
             "shards": {t.path: [] for t in taps}}
    path = folder / INDEX
    if not path.exists():
        return fresh
    old = _read_index(folder)
    for key in _KEYS:
        if old.get(key) != fresh[key]:
            raise GraftError(f"cache {folder} was written with another {key} ({old.get(key)!r} vs {fresh[key]!r}); "
                             "use a new --cache folder or delete this one")
    if old.get("regions") != fresh["regions"]:
        theirs = old.get("regions") or {}
        differ = [p for p in sorted(set(theirs) | set(fresh["regions"])) if theirs.get(p) != fresh["regions"].get(p)]
        raise GraftError(f"cache {folder} was written with other regions or graph nodes ({len(differ)} differ, first "
                         f"{differ[0]}); use a new --cache folder or delete this one")
    return old


def _read_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / INDEX).read_text())
    except (ValueError, UnicodeDecodeError):
        raise GraftError(f"cache index {folder / INDEX} is not valid JSON; delete the cache folder and record it "
                         "again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise GraftError(f"cache {folder} has index format {index.get('format') if isinstance(index, dict) else None!r}, "
                         f"not {FORMAT}; record it again in a new --cache folder")
    if not _index_ok(index):
        raise GraftError(f"cache index {folder / INDEX} is damaged (a field has the wrong type or is missing); delete "
                         "the cache folder and record it again")
    return index


def _index_ok(index: dict) -> bool:
    def count(v, lo=0):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    regions, shards = index.get("regions"), index.get("shards")
    if not (count(index.get("samples"), 1) and count(index.get("shard_size"), 1) and index.get("dtype") in DTYPES
            and isinstance(regions, dict) and isinstance(shards, dict) and set(shards) <= set(regions)):
        return False
    for entry in regions.values():
        if not (isinstance(entry, dict) and isinstance(entry.get("dir"), str) and isinstance(entry.get("fields"), dict)
                and all(isinstance(v, list) and all(count(d) for d in v) for v in entry["fields"].values())):
            return False
    constants = index.get("constants", {})
    if not isinstance(constants, dict) or not set(constants) <= set(regions) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sha256"), str)
            for e in constants.values()):
        return False
    for items in shards.values():
        if not isinstance(items, list):
            return False
        for e in items:
            if not (isinstance(e, dict) and count(e.get("index")) and isinstance(e.get("file"), str)
                    and count(e.get("count"), 1) and isinstance(e.get("sha256"), str)):
                return False
    return True


def _shard_done(folder: Path, index: dict, k: int) -> bool:
    for shards in index["shards"].values():
        entry = next((s for s in shards if s["index"] == k), None)
        if entry is None or not (folder / entry["file"]).exists():
            return False
    return True


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

class ActivationCache:
    """Read a cache folder: ``batch(indices, paths)`` -> {path: {field: tensor}}.

    ``taps``: the regions the run needs (each must be in the cache, read at the same graph
    nodes); ``model_hash``, ``data_hash``, ``seed``, ``samples``: what the run was given. Any
    difference is a GraftError naming it: a cache never silently feeds another teacher or data.
    """

    def __init__(self, folder, *, taps: list[Tap] | None = None, model_hash: str | None = None,
                 data_hash: str | None = None, seed: int | None = None, samples: int | None = None):
        self.folder = Path(folder)
        if not (self.folder / INDEX).exists():
            raise GraftError(f"{self.folder} is not an activation cache (no {INDEX}); write one with "
                             "graftfx distill --cache DIR")
        self.index = _read_index(self.folder)
        if not self.index.get("complete"):
            raise GraftError(f"cache {self.folder} is incomplete; rerun the same command to finish writing it")
        for key, want in (("model_hash", model_hash), ("data_hash", data_hash), ("seed", seed), ("samples", samples)):
            if want is not None and self.index.get(key) != want:
                raise GraftError(f"cache {self.folder} was recorded with {key} {self.index.get(key)!r} but this run "
                                 f"has {want!r}; record a new cache (another --cache folder) for this teacher/data")
        regions = self.index["regions"]
        for tap in taps or ():
            entry = regions.get(tap.path)
            if entry is None:
                raise GraftError(f"cache {self.folder} holds no region {tap.path} (it has {', '.join(regions)}); "
                                 "record a cache for these rules")
            if entry.get("tap") != tap_record(tap):
                raise GraftError(f"cache {self.folder} recorded {tap.path} at other graph nodes ({entry.get('tap')} vs "
                                 f"{tap_record(tap)}); record a new cache for this model's trace")
        self.samples = int(self.index["samples"])
        self.paths = [t.path for t in taps] if taps else list(regions)
        self._shards: dict[str, Shard] = {}
        self._fixed: dict[str, dict[str, torch.Tensor]] = {}

    def _shard(self, entry: dict, path: str) -> Shard:
        name = entry["file"]
        if name not in self._shards:
            file = (self.folder / name).resolve()
            if not file.is_relative_to(self.folder.resolve()):
                raise GraftError(f"cache index {self.folder / INDEX} names a shard outside the cache folder ({name}); "
                                 "the index is damaged: record the cache again")
            if not file.exists():
                raise GraftError(f"cache shard {file} is missing; rerun the cache write")
            if file_sha256(file) != entry["sha256"]:
                raise GraftError(f"cache shard {file} is corrupted (checksum mismatch); delete it and rerun the "
                                 "cache write to record it again")
            shard = Shard(file)
            for field, shape in self.index["regions"][path]["fields"].items():
                if shard.shape(field) != (entry["count"], *shape):
                    raise GraftError(f"cache shard {file}: {field} has shape {shard.shape(field)}, the index says "
                                     f"{(entry['count'], *shape)}")
            self._shards[name] = shard
        return self._shards[name]

    def batch(self, indices, paths=None) -> dict[str, dict[str, torch.Tensor]]:
        """{path: {field: tensor}} for samples ``indices``, in the cache's storage dtype (the
        trainer converts on its device)."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.samples):
            raise GraftError(f"cache index out of range 0..{self.samples - 1}")
        size = self.index["shard_size"]
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        unsort = np.argsort(order, kind="stable")
        bounds = np.flatnonzero(np.diff(ordered // size)) + 1
        out = {}
        for path in paths or self.paths:
            entries = {s["index"]: s for s in self.index["shards"][path]}
            parts: dict[str, list[np.ndarray]] = {f: [] for f in self.index["regions"][path]["fields"]}
            kinds: dict[str, str] = {}
            for group in np.split(ordered, bounds):
                if not group.size:
                    continue
                k = int(group[0] // size)
                if k not in entries:
                    raise GraftError(f"cache index {self.folder / INDEX} lists no shard {k} for {path}; the index is "
                                     "damaged: record the cache again")
                shard = self._shard(entries[k], path)
                for f in parts:
                    parts[f].append(shard.rows_np(f, group - k * size))
                    kinds[f] = shard.header[f]["dtype"]
            # gather in numpy: torch's CPU cat/indexing of float16 is a slow path
            out[path] = {f: _as_torch(np.concatenate(v)[unsort], kinds[f]) for f, v in parts.items()}
            out[path].update(self._constants(path))
        return out

    def index_of(self, path: str) -> dict:
        """The index entry of region ``path`` (its folder, tap and per-sample fields)."""
        return self.index["regions"][path]

    def _constants(self, path: str) -> dict[str, torch.Tensor]:
        entry = self.index.get("constants", {}).get(path)
        if entry is None:
            return {}
        if path not in self._fixed:
            self._fixed[path] = _read_constants(self.folder, path, entry)
        return self._fixed[path]


class ShardedCache:
    """Several cache folders read as one: each region from the folder that holds it (a rank's own
    cache, or one an earlier run with another world size left where this rank can see it)."""

    def __init__(self, caches: dict[str, ActivationCache]):
        self.by_path = caches
        counts = {c.samples for c in caches.values()}
        if len(counts) > 1:
            raise GraftError(f"cache folders hold different sample counts {sorted(counts)}; record them with one "
                             "--samples")
        self.samples = counts.pop() if counts else 0
        self.paths = list(caches)

    def index_of(self, path: str) -> dict:
        return self.by_path[path].index_of(path)

    def batch(self, indices, paths=None) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for path in paths or self.paths:
            out.update(self.by_path[path].batch(indices, paths=[path]))
        return out


def find_cached(root: Path, taps: list[Tap], **expect) -> dict[str, ActivationCache]:
    """The complete cache folders under ``root`` (``root`` itself and its sub-folders) that hold
    some of ``taps`` recorded as asked (same nodes, teacher, data, seed, samples): region path ->
    the cache to read it from. Folders that do not match are skipped, never an error."""
    found: dict[str, ActivationCache] = {}
    folders = [root] + (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    for folder in folders:
        if not (folder / INDEX).exists():
            continue
        try:
            cache = ActivationCache(folder, **expect)
        except GraftError:
            continue
        for tap in taps:
            entry = cache.index["regions"].get(tap.path)
            if tap.path not in found and entry is not None and entry.get("tap") == tap_record(tap):
                found[tap.path] = cache
    return found


class OnlineTeacher:
    """The same batches as a cache, computed on the fly from the teacher (no disk).

    Sample i is the same (data, t, noise) as in a cache of the same seed; its activations
    agree with the cached ones to the storage precision (CPU matmuls round the last bit
    differently for other batch groupings)."""

    def __init__(self, traced, taps: list[Tap], calib: CalibrationSet, dtype: str = "float16"):
        if dtype not in DTYPES:
            raise GraftError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        self.traced, self.taps, self.calib, self.dtype = traced, taps, calib, DTYPES[dtype]
        self.samples = calib.samples
        self.paths = [t.path for t in taps]

    def batch(self, indices, paths=None) -> dict[str, dict[str, torch.Tensor]]:
        taps = [t for t in self.taps if paths is None or t.path in paths]
        args, kwargs = self.calib.call(list(indices))
        got = record(self.traced, taps, args, kwargs)
        # in the storage dtype, as a cache returns them
        return {p: {f: stored(v, self.dtype) for f, v in fields.items()} for p, fields in got.items()}
