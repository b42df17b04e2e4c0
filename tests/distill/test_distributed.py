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

pytestmark = pytest.mark.xdist_group("distributed")   # one worker: the single-process runs are made once
import torch
from safetensors.torch import load_file

from graftfx.distill.stage1 import merge_rank_checkpoints
from graftfx.training import CheckpointStore

from .._distill_job import RULES, make_job

COMMON = ["--data", "digits", "--samples", "32", "--shard-size", "16", "--steps1", "6", "--batch1", "4",
          "--steps2", "3", "--batch2", "4", "--lr2", "1e-3", "--warmup2", "0", "--no-progress", "--ckpt-every", "3",
          "--log-every", "1", "--device", "cpu"]
ATOL = 1e-6
STAGE1, STAGE2 = ["--stage", "1"], ["--stage", "2"]


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
    """The step-3 stage-2 weights: rank 0's checkpoint, or every rank's FSDP shards joined."""
    root = run / "stage2" / "checkpoint"
    ranks = sorted(root.glob("rank*-of-*"))
    if not ranks:
        ckpt = CheckpointStore(root).require()
        assert ckpt.step == 3
        return ckpt.tensors("model")
    shards = []
    for folder in ranks:
        ckpt = CheckpointStore(folder).require()
        assert ckpt.step == 3 and ckpt.meta["sharded"] is True
        shards.append(ckpt.tensors("model"))
    sharded = set(ckpt.meta["shards"])   # FSDP2 shards dim 0 in rank order; buffers are saved whole
    return {k: torch.cat([s[k] for s in shards]) if k in sharded else shards[0][k] for k in shards[0]}


def _assert_follows_single(t, run, single="one"):
    """``run``'s stage-2 weights within ATOL of the single process's (``t/single``), which
    stage 2 really moved, by far more than the tolerance (from the teacher and, after stage 1,
    its trained operators)."""
    one, other = _stage2_model(t / single), _stage2_model(run)
    assert one.keys() == other.keys()
    diffs = {k: (one[k] - other[k]).abs().max().item() for k in one}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= ATOL, f"{run.name}: {worst} differs by {diffs[worst]:.3g} from the single-process run"
    start = load_file(str(t / "teacher.safetensors"))
    stage1 = CheckpointStore(t / single / "stage1" / "checkpoint").latest()
    if stage1 is not None:
        start.update(stage1.tensors("params"))
    known = [k for k in one if k in start and start[k].shape == one[k].shape]
    moved = [k for k in known if (one[k] - start[k]).abs().max().item() > 100 * ATOL]
    assert len(known) >= 0.5 * len(one) and len(moved) > 0.8 * len(known), f"only {len(moved)} tensors moved"


@pytest.fixture(scope="module")
def single2(single):
    """Stage 2 alone (the spliced operators as initialised, no stage 1), one process: what the
    FSDP runs, stage 2 alone too, are compared with."""
    _run(_base(single) + STAGE2 + ["--out", str(single / "one2")])
    return single / "one2"


def _stopped_and_resumed(argv, nproc):
    """Run to stage-2 step 2 (the last --steps2 counts), then ``--resume`` to step 3."""
    _run(argv + ["--steps2", "2"], nproc=nproc)
    _run(argv + ["--resume"], nproc=nproc)


def test_stage1_two_ranks_equal_one_process_and_stage2_ddp_resumes_and_follows_it(single):
    """Stage 1 sharded over 2 ranks equals one process exactly. Stage 2 under DDP (each block
    recomputed in backward: exact), stopped after step 2 and resumed, follows one uninterrupted
    process: on resume rank 0 alone reads its
    checkpoint and sends the state to the other rank by collectives (no shared files); a rank
    resuming from anything else would train other weights and move them by O(lr)."""
    t = single
    _stopped_and_resumed(_base(t) + ["--out", str(t / "two"), "--activation-checkpointing"], nproc=2)
    root = t / "two" / "stage1" / "checkpoint"
    assert (root / "rank1" / "step-0000006" / "params.safetensors").is_file()
    assert not list(root.glob("step-*")), "per-rank runs write per-rank checkpoint folders only"
    one = CheckpointStore(t / "one" / "stage1" / "checkpoint").require().tensors("params")
    two = merge_rank_checkpoints(t / "two" / "stage1", 2)
    assert one.keys() == two.keys() and len(one) == 16
    for k in one:
        assert torch.equal(one[k], two[k]), k
    assert CheckpointStore(t / "two" / "stage2" / "checkpoint").steps() == [2, 3]
    _assert_follows_single(t, t / "two")
    for rank in (0, 1):
        rows = [json.loads(line) for line in (t / "two" / "stage2" / f"metrics-rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss/total"]) for r in rows)


def test_stage2_fsdp_resumes_from_each_ranks_shards_follows_one_process_and_exports(single, single2):
    """FSDP2 in fp32, each block one unit recomputed in backward (the FSDP default), stopped after
    step 2 and resumed, every rank from its own shard folder (parameters, EMA, AdamW moments):
    it follows one uninterrupted process within the fp32 ATOL, and its export loads."""
    import graftfx
    from graftfx.models import load_dit

    t = single
    fsdp = _base(t) + STAGE2 + ["--out", str(t / "fsdp"), "--parallel", "fsdp", "--fsdp-precision", "fp32"]
    _stopped_and_resumed(fsdp, nproc=2)
    for rank in (0, 1):
        store = CheckpointStore(t / "fsdp" / "stage2" / "checkpoint" / f"rank{rank}-of-2")
        ckpt = store.require()
        assert store.steps() == [2, 3] and ckpt.meta["sharded"] is True and ckpt.has("train")
    _assert_follows_single(t, t / "fsdp", single="one2")
    # a fresh base for each: load_grafted loads the finetuned weights into the modules it shares with the base
    grafted = graftfx.load_grafted(load_dit(t / "teacher.safetensors"), t / "fsdp" / "grafted")
    single_export = graftfx.load_grafted(load_dit(t / "teacher.safetensors"), single2 / "grafted")
    x = load_dit(t / "teacher.safetensors").example_inputs(2)
    with torch.no_grad():
        out, want = grafted(*x), single_export(*x)
    assert torch.isfinite(out).all() and torch.allclose(out, want, atol=1e-5)


BF16_RTOL = 1e-2   # bf16 keeps 8 mantissa bits: a loss of ~1 moves by ~4e-3 per rounding, in either direction
# bf16 rounding changes each gradient by ~0.4% relative; AdamW's normalised step (lr = 1e-3) turns
# that into tiny weight differences, except where a gradient element is near zero and rounding
# flips its sign: those move by up to lr either way. Measured after 3 steps of stage 2 alone: mean
# |diff| 6.4e-6, and 0.39% of the elements differ by more than 1e-4. A real mismatch (a lost slice, other batches,
# gradients not averaged) moves most elements by O(lr): mean ~1e-4..1e-3, most of them past 1e-4.
BF16_MEAN, BF16_FAR = 5e-5, 0.02


def _global_losses(run, world) -> list[float]:
    """Each stage-2 step's loss over the global batch: the mean of the ranks' (equal) slices' losses."""
    names = [f"metrics-rank{r}.jsonl" for r in range(world)] if world > 1 else ["metrics.jsonl"]
    per_rank = [[json.loads(line)["loss/total"] for line in (run / "stage2" / n).read_text().splitlines()]
                for n in names]
    return [sum(v) / world for v in zip(*per_rank)]


def test_stage2_fsdp_bf16_follows_the_loss_curve_of_one_fp32_process(single, single2):
    """FSDP2 with bf16 parameters in forward and backward (fp32 reduction and master weights;
    tests/training/test_fsdp.py checks the dtypes): the same loss curve as one fp32 process within
    bf16 rounding, and weights within what bf16 rounding moves (BF16_MEAN, BF16_FAR above)."""
    t = single
    _run(_base(t) + STAGE2 + ["--out", str(t / "bf16"), "--parallel", "fsdp"], nproc=2)
    want, got = _global_losses(single2, 1), _global_losses(t / "bf16", 2)
    assert len(want) == len(got) == 3
    for a, b in zip(want, got):
        assert abs(a - b) <= BF16_RTOL * abs(a), (want, got)
    one, bf16 = _stage2_model(single2), _stage2_model(t / "bf16")
    diff = torch.cat([(one[k] - bf16[k]).abs().flatten() for k in one])
    assert diff.mean().item() <= BF16_MEAN and (diff > 1e-4).float().mean().item() <= BF16_FAR, (
        diff.mean().item(), (diff > 1e-4).float().mean().item())


# ------------------------------------------------------------------ scale-out (stage 1)


def _stage1_params(run) -> dict[str, torch.Tensor]:
    """A run's stage-1 weights as exported (every rank's regions, gathered by collectives)."""
    return load_file(str(run / "grafted" / "model.safetensors"))


def test_four_ranks_with_four_node_local_caches_equal_one_process(single):
    """As on 4 nodes without a shared filesystem: '{rank}' gives each rank its own cache root; each
    root holds only its rank's regions, and the gathered weights equal the single process's."""
    t = single
    _run(_base(t) + ["--out", str(t / "four"), "--cache", str(t / "node{rank}")] + STAGE1, nproc=4)
    one = CheckpointStore(t / "one" / "stage1" / "checkpoint").require().tensors("params")
    got = _stage1_params(t / "four")
    for k in one:
        assert torch.equal(one[k], got[k]), k
    held = []
    for rank in range(4):
        folders = sorted(p.name for p in (t / f"node{rank}").iterdir())
        assert folders == [f"rank{rank}-of-4"], folders
        index = json.loads((t / f"node{rank}" / folders[0] / "index.json").read_text())
        assert index["writer"] == {"rank": rank, "world": 4} and index["samples"] == 32
        regions = list(index["regions"])
        assert len(regions) == 1, regions           # 4 regions of similar cost over 4 ranks: one each
        held += regions
    assert sorted(held) == ["blocks.1.attn", "blocks.1.mlp", "blocks.3.attn", "blocks.3.mlp"]


def test_a_resharded_run_reuses_the_cache_folders_that_match_and_records_only_the_rest(single):
    """The 4 ranks' folders pooled in one place (as copied off the nodes), 3 of them: a 2-rank
    run records only the missing region, into one new folder; with all 4 pooled, one process
    records nothing. Both end with the single process's weights."""
    t = single
    if not (t / "node0").is_dir():
        test_four_ranks_with_four_node_local_caches_equal_one_process(single)
    pooled = t / "pooled"
    pooled.mkdir()
    folders = {r: t / f"node{r}" / f"rank{r}-of-4" for r in range(4)}
    for r in (0, 1, 2):
        (pooled / folders[r].name).symlink_to(folders[r], target_is_directory=True)
    one = CheckpointStore(t / "one" / "stage1" / "checkpoint").require().tensors("params")
    missing = list(json.loads((folders[3] / "index.json").read_text())["regions"])
    _run(_base(t) + ["--out", str(t / "reshard2"), "--cache", str(pooled)] + STAGE1, nproc=2)
    new = [p for p in pooled.iterdir() if not p.is_symlink()]
    assert [p.name for p in new] in (["rank0-of-2"], ["rank1-of-2"]), new
    assert list(json.loads((new[0] / "index.json").read_text())["regions"]) == missing
    got = _stage1_params(t / "reshard2")
    for k in one:
        assert torch.equal(one[k], got[k]), k
    new[0].rename(t / "reshard2-cache")
    (pooled / folders[3].name).symlink_to(folders[3], target_is_directory=True)
    res = _run(_base(t) + ["--out", str(t / "reshard1"), "--cache", str(pooled)] + STAGE1)
    assert "reused from 4 folder(s)" in res.stdout and sorted(p.name for p in pooled.iterdir()) == sorted(
        f.name for f in folders.values())
    got = _stage1_params(t / "reshard1")
    for k in one:
        assert torch.equal(one[k], got[k]), k


THREE = RULES.replace('select = { preset = "paper-50" }\noptions = { ratio = 3 }',
                      'select = { indices = [3] }\noptions = { ratio = 3 }')   # attention x2 + one MLP


def test_six_ranks_on_three_regions_train_data_parallel_like_one(single):
    """More ranks than regions: each region is trained by a group of ranks, each on a slice of
    the batch with gradients averaged in the group; the weights follow one process's within fp32
    reduction order (the same ATOL argument as stage 2's, above)."""
    t = single
    (t / "three.toml").write_text(THREE)
    argv = ["distill", str(t / "three.toml"), "--model", str(t / "teacher.safetensors")] + COMMON + STAGE1
    argv[argv.index("--batch1") + 1] = "6"          # divisible by every group size (1..4)
    _run(argv + ["--out", str(t / "three-one")])
    res = _run(argv + ["--out", str(t / "three-six")], nproc=6)
    groups = res.stdout[res.stdout.index("stage 1 ranks:"):].splitlines()[0]
    assert groups.count("[") == 3 and all(f"{r}" in groups for r in range(6)), groups   # 3 groups over 6 ranks
    one, six = _stage1_params(t / "three-one"), _stage1_params(t / "three-six")
    start = load_file(str(t / "teacher.safetensors"))
    trained = [k for k in one if k.startswith(("blocks.1.attn", "blocks.3.attn", "blocks.3.mlp"))]
    assert len(trained) == 12
    for k in trained:
        diff = (one[k] - six[k]).abs()
        if k.endswith("attn.qkv.bias"):
            # the key bias has a gradient of exactly zero (softmax ignores a shift shared by all keys):
            # what is left is rounding noise, which AdamW turns into steps of up to lr each, in either
            # run; so it is held to steps x lr, and everything else to ATOL
            width = diff.numel() // 3
            assert diff[width:2 * width].max().item() <= 6 * 5e-4, k
            diff = torch.cat([diff[:width], diff[2 * width:]])
        assert diff.max().item() <= ATOL, k
    moved = [k for k in trained if k not in start or start[k].shape != one[k].shape
             or (one[k] - start[k]).abs().max().item() > 100 * ATOL]
    assert len(moved) == len(trained)


def test_a_rank_killed_mid_run_is_restarted_by_torchrun_and_ends_identical(single, tmp_path):
    """SIGKILL one rank while it writes its step-6 checkpoint; torchrun --max-restarts 1 restarts
    both ranks (a spare restart or two absorb a gloo connect race of a loaded machine), which agree on
    the newest step both have (3) and finish with the weights of an
    uninterrupted run."""
    import os
    import signal
    import time

    t = single
    marker = tmp_path / "paused"
    env = {**os.environ, "GRAFTFX_TEST_CHECKPOINT_PAUSE": f"6:files:{marker}", "GRAFTFX_DIST_TIMEOUT": "45"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "3",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "graftfx"]
    argv += _base(t) + ["--out", str(t / "killed")] + STAGE1
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert marker.exists(), "no rank reached the step-6 checkpoint"
        time.sleep(0.3)
        step3 = {p: p.stat().st_mtime_ns for p in (t / "killed" / "stage1" / "checkpoint").glob("rank*/step-0000003/*")}
        os.kill(int(marker.read_text().strip()), signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Connection closed by peer" in err or "SIGKILL" in err or "-9" in err, err[-3000:]   # the kill landed
    # resumed, not started over: a fresh start would have removed and rewritten the step-3 checkpoints
    assert len(step3) >= 2 and all(p.stat().st_mtime_ns == m for p, m in step3.items())
    one = CheckpointStore(t / "one" / "stage1" / "checkpoint").require().tensors("params")
    got = _stage1_params(t / "killed")
    for k in one:
        assert torch.equal(one[k], got[k]), k
