"""Atomic file writes: every file lands under a temporary name in its own folder, is flushed to
disk, then renamed over the target, so a reader (or a crash) never sees half a file."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:  # ordinary permissions (umask), unlike mkstemp's 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for a file or folder being written."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """``tensors`` as a safetensors file (contiguous CPU copies), written atomically."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(flat, metadata=metadata))
