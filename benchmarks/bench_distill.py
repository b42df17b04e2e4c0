"""Distillation I/O and stage-1 cost.

    python benchmarks/bench_distill.py [--folder /tmp/graftfx-bench] [--xl-steps 2]

1. Cache write and read throughput (GB/s) beside the disk's own rate (dd of the same size).
   Target: cache I/O >= 50% of the disk's rate.
2. Stage 1 steps/s and peak memory (max RSS of a fresh process) for DiT-S/2 and DiT-XL/2 with
   random weights, 14 grafted regions (MHA -> Hyena-X on the paper's 50% layers... DiT-S/2 has
   12 blocks, so 6), trained from a cache. The process builds the operators from a plan traced
   on the meta device: the teacher is never materialised. Target: DiT-XL/2 under 4 GB.
   The cache holds random activations of the right shapes (random weights make real ones no
   more meaningful, and recording DiT-XL/2 on 2 CPU cores would take hours).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def synthetic_cache(folder: Path, regions: dict[str, list[int]], samples: int, shard_size: int, dtype=torch.float16):
    """A valid cache (index + checksummed shards) of random activations of the given shapes."""
    from graftfx.distill.cache import FORMAT, INDEX, _write_json, write_shard

    folder.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "samples": samples, "shard_size": shard_size, "dtype": str(dtype).replace("torch.", ""),
             "seed": 0, "model_hash": "bench", "data_hash": "bench", "complete": True,
             "regions": {p: {"dir": f"r{i:03d}", "tap": {"input": f"{p}_in", "output": f"{p}_out", "context": None},
                             "fields": {"input": s, "output": s}} for i, (p, s) in enumerate(regions.items())},
             "shards": {p: [] for p in regions}}
    written, seconds = 0, 0.0
    for p, shape in regions.items():
        d = index["regions"][p]["dir"]
        (folder / d).mkdir(exist_ok=True)
        for k in range(math.ceil(samples / shard_size)):
            n = min(shard_size, samples - k * shard_size)
            t = torch.randn(n, *shape).to(dtype)
            rel = f"{d}/shard-{k:05d}.safetensors"
            start = time.perf_counter()  # only the writing counts, not making the random data
            sha = write_shard(folder / rel, {"input": t, "output": t})
            seconds += time.perf_counter() - start
            written += 2 * t.numel() * t.element_size()
            index["shards"][p].append({"index": k, "file": rel, "start": k * shard_size, "count": n, "sha256": sha})
    _write_json(folder / INDEX, index)
    return written, seconds


def drop_page_cache() -> bool:
    """Empty the OS page cache so reads come from the disk (needs root); False if not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def dd_rate(folder: Path, nbytes: int) -> tuple[float, float]:
    """(write GB/s with fdatasync, read GB/s) of dd on a file of ``nbytes``."""
    path = folder / "dd.bin"
    mb = max(1, nbytes // (1 << 20))
    out = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mb}", "conv=fdatasync"],
                         capture_output=True, text=True).stderr
    write = _dd_gbps(out)
    drop_page_cache()
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True, text=True).stderr
    read = _dd_gbps(out)
    path.unlink()
    return write, read


def _dd_gbps(text: str) -> float:
    m = re.search(r"(\d+) bytes .* ([\d.]+) s,", text)
    return int(m.group(1)) / float(m.group(2)) / 1e9 if m else float("nan")


def read_rate(folder: Path, batch: int, batches: int) -> float:
    from graftfx.distill.cache import ActivationCache

    cache = ActivationCache(folder)
    g = torch.Generator().manual_seed(0)
    cache.batch(list(range(0, cache.samples, cache.index["shard_size"])))  # checksums once, outside the timing
    drop_page_cache()
    nbytes, start = 0, time.perf_counter()
    for _ in range(batches):
        got = cache.batch(torch.randint(cache.samples, (batch,), generator=g).tolist())
        nbytes += sum(t.numel() * t.element_size() for f in got.values() for t in f.values())
    return nbytes / (time.perf_counter() - start) / 1e9


STAGE1_CHILD = r"""
import json, resource, sys, time, torch
import graftfx
from graftfx.models import DiT_models
from graftfx.distill import ActivationCache, RegionJob, Stage1Config, train_stage1
from graftfx.splice import build_operator
name, folder, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with torch.device("meta"):
    model = DiT_models[name]().eval()
plan = graftfx.select(graftfx.trace(model, model.example_inputs(2)), "dit-xl2-mha-hyena_x-50p.toml")
jobs = [RegionJob(r.path, r.path, build_operator(rule, r, device="cpu"), rule.effective_loss, r.kind) for rule, r in plan.selected]
del model, plan
cache = ActivationCache(folder)
cfg = Stage1Config(steps=steps, batch_size=8, log_every=1, ckpt_every=10**9)
train_stage1(jobs, cache, Stage1Config(steps=1, batch_size=8, ckpt_every=10**9), out + "/warm", progress=False)
start = time.perf_counter()
train_stage1(jobs, cache, cfg, out + "/run", progress=False)
sec = time.perf_counter() - start
print(json.dumps({"regions": len(jobs), "steps_per_s": steps / sec, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def stage1(name: str, folder: Path, steps: int, tokens: int, width: int, regions: list[str]) -> dict:
    synthetic_cache(folder / "cache", {p: [tokens, width] for p in regions}, samples=64, shard_size=32)
    res = subprocess.run([sys.executable, "-c", STAGE1_CHILD, name, str(folder / "cache"), str(steps), str(folder)],
                         capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="/tmp/graftfx-bench", help="scratch folder (deleted at the end)")
    p.add_argument("--gb", type=float, default=1.0, help="cache size for the I/O test, GB")
    p.add_argument("--xl-steps", type=int, default=2, help="timed stage-1 steps for DiT-XL/2")
    p.add_argument("--s-steps", type=int, default=10, help="timed stage-1 steps for DiT-S/2")
    p.add_argument("--read-batch", type=int, default=8, help="samples per random read (stage 1's batch)")
    p.add_argument("--read-batches", type=int, default=100, help="random reads timed")
    p.add_argument("--skip-stage1", action="store_true", help="only the I/O part")
    args = p.parse_args()
    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"# bench_distill  {datetime.date.today()}  torch {torch.__version__}  {torch.get_num_threads()} threads  "
          f"command: python {' '.join(sys.argv)}")
    # 1. I/O at DiT-XL/2 region shapes (256 tokens x 1152, fp16)
    samples = int(args.gb * 1e9 / (2 * 256 * 1152 * 2 * 14))
    regions = {f"blocks.{i}.attn": [256, 1152] for i in range(1, 28, 2)}
    written, seconds = synthetic_cache(folder / "io", regions, samples, shard_size=256)  # the CLI default
    dd_w, dd_r = dd_rate(folder, written)
    rd = read_rate(folder / "io", batch=args.read_batch, batches=args.read_batches)
    cold = "cold: page cache dropped" if drop_page_cache() else "warm: page cache could not be dropped"
    print(f"\n| cache I/O ({cold}) | GB | cache GB/s | dd GB/s | ratio | target |\n|---|---|---|---|---|---|")
    print(f"| write (fsync per shard) | {written / 1e9:.2f} | {written / seconds / 1e9:.2f} | {dd_w:.2f} | "
          f"{written / seconds / 1e9 / dd_w:.0%} | >= 50% |")
    print(f"| random minibatch read (batch {args.read_batch}, {args.read_batches} batches) | - | {rd:.2f} | {dd_r:.2f} | {rd / dd_r:.0%} | >= 50% |")
    shutil.rmtree(folder / "io")
    if args.skip_stage1:
        return
    # 2. stage 1
    print("\n| stage 1 from cache | regions | steps/s | peak RSS GB | target |\n|---|---|---|---|---|")
    s = stage1("DiT-S/2", folder / "s", args.s_steps, 256, 384, [f"blocks.{i}.attn" for i in range(1, 12, 2)])
    print(f"| DiT-S/2, random weights | {s['regions']} | {s['steps_per_s']:.2f} | {s['peak_rss_gb']:.2f} | |")
    xl = stage1("DiT-XL/2", folder / "xl", args.xl_steps, 256, 1152, list(regions))
    print(f"| DiT-XL/2, random weights | {xl['regions']} | {xl['steps_per_s']:.3f} | {xl['peak_rss_gb']:.2f} | "
          f"< 4 GB: {'met' if xl['peak_rss_gb'] < 4 else 'MISSED'} |")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
