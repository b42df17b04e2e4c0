"""Atomic file writes for everything graftfx writes: a temporary sibling, flushed to disk, then
renamed over the target, so a reader (or a crash) never sees half a file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for a file or folder being written."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer to fill; on success it is renamed to
    ``path`` (with ordinary umask permissions), on failure deleted. The folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create files 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def atomic_torch_save(path, obj) -> Path:
    """``torch.save`` atomically (for plain containers of tensors: loads with weights_only=True)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_save_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """``tensors`` as a safetensors file (contiguous CPU copies), written atomically."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(flat, metadata=metadata))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB chunks (shards and exported weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def test_pause(env: str, at: int) -> None:
    """Tests only: when the environment variable ``env`` is ``"K:MARKER"`` and ``at == K``, create
    MARKER (holding this pid) and sleep, so a test can SIGKILL the process right there. Once: not
    when MARKER exists already (a rerun goes on)."""
    import time

    spec = os.environ.get(env)
    if spec:
        k, marker = spec.split(":", 1)
        if int(k) == at and not Path(marker).exists():
            Path(marker).write_text(f"{os.getpid()}\n", encoding="utf-8")
            time.sleep(600)
