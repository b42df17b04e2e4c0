"""torchrun with 2 CPU processes (gloo): stage 1 equals the single-process run; stage 2 runs."""
import json
import math
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

RULES = """version = 1
[[rule]]
pattern = "self_attention"
operator = "mha"
select = { preset = "paper-50" }
options = { init = "fresh" }
[[rule]]
pattern = "mlp"
operator = "mlp"
select = { preset = "paper-50" }
options = { ratio = 3 }
"""
COMMON = ["--data", "digits", "--samples", "32", "--shard-size", "16", "--steps1", "6", "--batch1", "4",
          "--steps2", "3", "--batch2", "4", "--no-progress", "--ckpt-every", "3", "--device", "cpu"]


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


@pytest.fixture
def setup(tmp_path, digits_dit):
    save_file(digits_dit.state_dict(), str(tmp_path / "teacher.safetensors"))
    (tmp_path / "rules.toml").write_text(RULES)
    return tmp_path


def test_stage1_two_ranks_equal_one_process_and_stage2_ddp_runs(setup):
    t = setup
    base = ["distill", str(t / "rules.toml"), "--model", str(t / "teacher.safetensors")] + COMMON
    _run(base + ["--out", str(t / "one"), "--stage", "1"])
    _run(base + ["--out", str(t / "two"), "--stage", "1"], nproc=2)
    one = load_file(str(t / "one" / "grafted" / "model.safetensors"))
    two = load_file(str(t / "two" / "grafted" / "model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k
    assert (t / "two" / "stage1" / "checkpoint" / "rank1" / "params.safetensors").exists()
    _run(base + ["--out", str(t / "ddp"), "--stage", "2"], nproc=2)
    for rank in (0, 1):
        rows = [json.loads(line) for line in (t / "ddp" / "stage2" / f"metrics-rank{rank}.jsonl").read_text().splitlines()]
        assert rows and all(math.isfinite(r["loss/total"]) for r in rows)


def test_stage2_fsdp_runs_and_exports_a_loadable_model(setup, digits_dit):
    import graftfx

    t = setup
    base = ["distill", str(t / "rules.toml"), "--model", str(t / "teacher.safetensors")] + COMMON
    _run(base + ["--out", str(t / "fsdp"), "--stage", "2", "--parallel", "fsdp"], nproc=2)
    rows = [json.loads(line) for line in (t / "fsdp" / "stage2" / "metrics-rank0.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss/total"]) for r in rows)
    from graftfx.models import load_dit

    teacher = load_dit(t / "teacher.safetensors")
    grafted = graftfx.load_grafted(teacher, t / "fsdp" / "grafted")
    out = grafted(*teacher.example_inputs(2))
    assert torch.isfinite(out).all()
