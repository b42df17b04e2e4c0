"""A real SIGKILL while stage 1 writes a checkpoint, then --resume: the final weights are the
uninterrupted run's, bit for bit. (Before graftfx.training, stage 1 replaced params.safetensors
before optim.pt and state.json in one folder: a kill between them resumed the step-N weights with
the step-(N-k) optimizer and step counter, and the run ended with different weights, exit 0.)

The writer is made to pause between the first and the second file of the step folder
(GRAFTFX_TEST_CHECKPOINT_PAUSE), so the kill lands exactly there."""
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from graftfx.training import CheckpointStore
from graftfx.training.checkpoint import PAUSE_ENV

from .._distill_job import make_job

ARGS = ["--data", "digits", "--samples", "24", "--shard-size", "12", "--stage", "1", "--steps1", "6", "--batch1", "4",
        "--ckpt-every", "2", "--log-every", "1", "--no-progress", "--device", "cpu"]


def _cmd(t, out, *extra):
    return [sys.executable, "-m", "graftfx", "distill", str(t / "rules.toml"), "--model", str(t / "teacher.safetensors"),
            *ARGS, "--out", str(out), *extra]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env.update(OMP_NUM_THREADS="1", **extra)  # the same thread count in every run: bit-exact on the CPU
    return env


def _run(cmd, env):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.fixture
def job(tmp_path):
    return make_job(tmp_path)


def test_sigkill_while_writing_a_checkpoint_then_resume_equals_the_uninterrupted_run(job):
    t = job
    _run(_cmd(t, t / "whole"), _env())

    marker = t / "writer-paused"
    with open(t / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(t, t / "split"), stdout=log, stderr=subprocess.STDOUT,
                                env=_env(**{PAUSE_ENV: f"4:files:{marker}"}))
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before checkpoint 4: " \
                                            f"{(t / 'killed.log').read_text()[-3000:]}"
                assert time.monotonic() < deadline, "the writer never reached checkpoint 4"
                time.sleep(0.05)
            proc.kill()  # SIGKILL: no cleanup, no finally blocks
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -9

    root = t / "split" / "stage1" / "checkpoint"
    temp = [p for p in root.iterdir() if p.name.startswith(".step-0000004.")]
    assert len(temp) == 1 and sorted(p.name for p in temp[0].iterdir()) == ["params.safetensors"]
    assert not (root / "step-0000004").exists()
    assert CheckpointStore(root).require().step == 2    # what a resume will read

    _run(_cmd(t, t / "split", "--resume"), _env())
    a = CheckpointStore(t / "whole" / "stage1" / "checkpoint").require()
    b = CheckpointStore(root).require()
    assert a.step == b.step == 6
    pa, pb = a.tensors("params"), b.tensors("params")
    assert pa.keys() == pb.keys() and len(pa) == 16
    different = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not different, f"{len(different)} of {len(pa)} tensors differ from the uninterrupted run: {different}"
    ea = load_file(str(t / "whole" / "grafted" / "model.safetensors"))
    eb = load_file(str(t / "split" / "grafted" / "model.safetensors"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert (t / "whole" / "stage1" / "metrics.jsonl").read_text() == (t / "split" / "stage1" / "metrics.jsonl").read_text()
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "the crashed writer's temp folder was left"
