"""Metrics as JSON lines, one record per logged step; a resumed run first drops the records past
the step it resumes from (the steps after it are trained, and logged, again)."""
from __future__ import annotations

import errno
import json
from pathlib import Path

from graftfx.errors import GraftError
from graftfx.io import atomic_write_text


class Metrics:
    """Append-only JSONL of records that carry a ``"step"``."""

    def __init__(self, path):
        self.path = Path(path)

    def start(self, resumed_from: int | None) -> None:
        """A new run: an empty file; a resumed one: the records up to ``resumed_from`` only."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resumed_from is None:
                atomic_write_text(self.path, "")
            else:
                self.truncate(resumed_from)
        except OSError as e:
            raise disk_error(e, self.path) from None

    def truncate(self, step: int) -> None:
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise disk_error(e, self.path) from None

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TrainingWriteError(GraftError, OSError):
    """A training file (metrics, plot) that could not be written: a GraftError and an OSError."""


def disk_error(e: OSError, path) -> GraftError:
    """A failed write of a training file as a one-line error (the checkpoints stay as they are)."""
    reason = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return TrainingWriteError(f"writing {path} failed: {reason}; the last complete checkpoint is kept: free space and "
                      "rerun with --resume")
