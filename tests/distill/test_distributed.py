"""torchrun with 2 CPU processes (gloo) against one single-process run of the same job:
stage 1 (regions sharded over ranks) equals it exactly; stage 2 under DDP and under FSDP
follows it on the same global batch within fp32 rounding.

Tolerance (stage 2): the ranks compute the same arithmetic as the single process except for the
order of floating-point sums (the mean gradient is an all-reduce / reduce-scatter average of two
half-batch means rather than one full-batch mean; FSDP's gathered parameters and sharded norm
likewise), so gradients differ by a few fp32 ulps (relative ~1e-7). AdamW (eps 1e-8) turns that
into a step difference far below its step size lr = 1e-3; measured: 3e-8 after 3 steps, i.e. one
ulp of the weights. ATOL = 1e-6 is 30x that and 1000x below one step, while any real mismatch
(other batches on a rank, a rank's slice lost, gradients not averaged) moves weights by O(lr).
"""
import json
import math
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from graftfx.distill.stage1 import merge_rank_checkpoints
from graftfx.training import CheckpointStore

from .._distill_job import make_job

COMMON = ["--data", "digits", "--samples", "32", "--shard-size", "16", "--steps1", "6", "--batch1", "4",
          "--steps2", "3", "--batch2", "4", "--lr2", "1e-3", "--warmup2", "0", "--no-progress", "--ckpt-every", "3",
          "--log-every", "1", "--device", "cpu"]
ATOL = 1e-6
LR2 = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv, nproc=1):
    prefix = [sys.executable, "-m", "graftfx"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "graftfx"]
    res = subprocess.run(prefix + argv, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run (both stages) the distributed runs are compared with."""
    t = tmp_path_factory.mktemp("distributed")
    make_job(t)
    _run(_base(t) + ["--out", str(t / "one")])
    return t


def _base(t):
    return ["distill", str(t / "rules.toml"), "--model", str(t / "teacher.safetensors")] + COMMON


def _stage2_model(run) -> dict[str, torch.Tensor]:
    ckpt = CheckpointStore(run / "stage2" / "checkpoint").require()
    assert ckpt.step == 3
    return ckpt.tensors("model")


def _assert_follows_single(t, run):
    one, other = _stage2_model(t / "one"), _stage2_model(run)
    assert one.keys() == other.keys()
    diffs = {k: (one[k] - other[k]).abs().max().item() for k in one}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= ATOL, f"{run.name}: {worst} differs by {diffs[worst]:.3g} from the single-process run"
    # ... and stage 2 really moved the weights, by far more than the tolerance
    start = {**load_file(str(t / "teacher.safetensors")),
             **CheckpointStore(t / "one" / "stage1" / "checkpoint").require().tensors("params")}
    moved = [k for k in one if k in start and (one[k] - start[k]).abs().max().item() > 100 * ATOL]
    assert len(moved) > 0.8 * len(one), f"only {len(moved)} of {len(one)} tensors moved in stage 2"


def test_stage1_two_ranks_equal_one_process_and_stage2_ddp_follows_it(single):
    t = single
    _run(_base(t) + ["--out", str(t / "two")], nproc=2)
    root = t / "two" / "stage1" / "checkpoint"
    assert (root / "rank1" / "step-0000006" / "params.safetensors").is_file()
    assert not list(root.glob("step-*")), "per-rank runs write per-rank checkpoint folders only"
    one = CheckpointStore(t / "one" / "stage1" / "checkpoint").require().tensors("params")
    two = merge_rank_checkpoints(t / "two" / "stage1", 2)
    assert one.keys() == two.keys() and len(one) == 16
    for k in one:
        assert torch.equal(one[k], two[k]), k
    _assert_follows_single(t, t / "two")
    for rank in (0, 1):
        rows = [json.loads(line) for line in (t / "two" / "stage2" / f"metrics-rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss/total"]) for r in rows)


def test_stage2_fsdp_follows_one_process_and_exports_a_loadable_model(single):
    import graftfx
    from graftfx.models import load_dit

    t = single
    _run(_base(t) + ["--out", str(t / "fsdp"), "--parallel", "fsdp"], nproc=2)
    _assert_follows_single(t, t / "fsdp")
    ckpt = CheckpointStore(t / "fsdp" / "stage2" / "checkpoint").require()
    assert ckpt.meta["resumable"] is False and not ckpt.has("train")
    # a fresh base for each: load_grafted loads the finetuned weights into the modules it shares with the base
    grafted = graftfx.load_grafted(load_dit(t / "teacher.safetensors"), t / "fsdp" / "grafted")
    single_export = graftfx.load_grafted(load_dit(t / "teacher.safetensors"), t / "one" / "grafted")
    x = load_dit(t / "teacher.safetensors").example_inputs(2)
    with torch.no_grad():
        out, want = grafted(*x), single_export(*x)
    assert torch.isfinite(out).all() and torch.allclose(out, want, atol=1e-5)
