"""Faults injected into real ``graftfx distill`` processes: SIGKILLs at chosen and random moments
(inside checkpoint and cache writes through the test hooks), full disks (a small tmpfs, or a
per-file size limit where mounting is not allowed), cache corruption, and two runs sharing one
``--cache``. Every fault is judged against an uninterrupted run of the same job:

- a killed run, resumed, must end with exactly the uninterrupted run's weights, checkpoints,
  export and metrics, and every cache shard must verify (``silently wrong`` / ``data lost``);
- a full disk must be one clean error line, with the earlier checkpoint and the cache intact,
  and the job, rerun on a disk with room, must again equal the uninterrupted run;
- a corrupted cache must be refused by name, never read;
- two runs on one cache: same settings both succeed with the same result, other settings one
  succeeds and the other is told the cache was written with other settings.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    from .._distill_job import make_job
    from ._harness import Case, Result, Tally
except ImportError:  # run by measure.py, which puts this folder (and tests/, for _distill_job) on sys.path
    from _distill_job import make_job
    from _harness import Case, Result, Tally

# stage 1: steps 2, 4, 6 are checkpoints; stage 2: 2 ... 10 (8 and 10 exist only in stage 2)
ARGS = ["--data", "digits", "--samples", "24", "--shard-size", "6", "--stage", "both", "--steps1", "6",
        "--batch1", "4", "--steps2", "10", "--batch2", "4", "--ckpt-every", "2", "--log-every", "1",
        "--no-progress", "--device", "cpu"]
CKPT_PAUSE = "GRAFTFX_TEST_CHECKPOINT_PAUSE"
CACHE_PAUSE = "GRAFTFX_TEST_CACHE_PAUSE"


def command(job: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "graftfx", "distill", str(job / "rules.toml"), "--model",
            str(job / "teacher.safetensors"), *ARGS, "--out", str(out), *extra]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in (CKPT_PAUSE, CACHE_PAUSE)}
    e.update(OMP_NUM_THREADS="1", **extra)     # the same thread count in every run: bit-exact on the CPU
    return e


def run(cmd, environ, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environ, **kw)


def one_line_error(res: subprocess.CompletedProcess) -> bool:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    return res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# comparing a run with the uninterrupted one
# ---------------------------------------------------------------------------------------------

def outputs(out: Path) -> dict:
    """What a finished run leaves: final checkpoints of both stages, the export, the metrics."""
    from safetensors.torch import load_file

    from graftfx.training import CheckpointStore

    got = {}
    for stage, names in (("stage1", ("params",)), ("stage2", ("model", "ema"))):
        ck = CheckpointStore(out / stage / "checkpoint").latest()
        got[f"{stage}/step"] = ck.step if ck else None
        for n in names:
            got[f"{stage}/{n}"] = ck.tensors(n) if ck else None
    export = out / "grafted" / "model.safetensors"
    got["export"] = load_file(str(export)) if export.exists() else None
    for stage in ("stage1", "stage2"):
        m = out / stage / "metrics.jsonl"
        got[f"{stage}/metrics"] = m.read_text() if m.exists() else None
    return got


def differences(a: dict, b: dict) -> list[str]:
    import torch

    bad = []
    for k in a:
        x, y = a[k], b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys() or not all(torch.equal(x[t], y[t]) for t in x):
                n = sum(1 for t in x if t not in y or not torch.equal(x[t], y[t]))
                bad.append(f"{k}: {n} of {len(x)} tensors differ")
        elif x != y:
            bad.append(f"{k} differs")
    return bad


def verify_cache(folder: Path) -> tuple[int, str]:
    """(shards verified, problem or ''): every shard the index lists, checksum and shape."""
    from graftfx.distill.cache import INDEX, ActivationCache
    from graftfx.errors import GraftError

    if not (folder / INDEX).exists():
        return 0, ""
    try:
        index = json.loads((folder / INDEX).read_text())
    except ValueError:
        return 0, "index.json unreadable"
    if not index.get("complete"):
        # an interrupted write: each shard the index names must still verify
        from graftfx.io import file_sha256

        n = 0
        for shards in index["shards"].values():
            for s in shards:
                f = folder / s["file"]
                if not f.exists() or file_sha256(f) != s["sha256"]:
                    return n, f"shard {s['file']} named by the index does not verify"
                n += 1
        return n, ""
    try:
        cache = ActivationCache(folder)
        cache.batch(range(cache.samples))
    except GraftError as e:
        return 0, str(e)
    return sum(len(v) for v in cache.index["shards"].values()), ""


# ---------------------------------------------------------------------------------------------
# SIGKILL
# ---------------------------------------------------------------------------------------------

def kill_moments(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, spec): hook pauses inside checkpoint writes of both stages and inside cache writes,
    then random moments (seconds after start)."""
    hooks = [("stage 1 checkpoint, between files", f"{CKPT_PAUSE}=2:files"),
             ("stage 1 checkpoint, before the pointer", f"{CKPT_PAUSE}=2:pointer"),
             ("stage 1 checkpoint, between files", f"{CKPT_PAUSE}=4:files"),
             ("stage 1 checkpoint, before the pointer", f"{CKPT_PAUSE}=4:pointer"),
             ("stage 1 last checkpoint, between files", f"{CKPT_PAUSE}=6:files"),
             ("stage 1 last checkpoint, before the pointer", f"{CKPT_PAUSE}=6:pointer"),
             ("stage 2 checkpoint, between files", f"{CKPT_PAUSE}=8:files"),
             ("stage 2 checkpoint, before the pointer", f"{CKPT_PAUSE}=8:pointer"),
             ("stage 2 last checkpoint, between files", f"{CKPT_PAUSE}=10:files"),
             ("stage 2 last checkpoint, before the pointer", f"{CKPT_PAUSE}=10:pointer"),
             ("cache shard 0, between region files", f"{CACHE_PAUSE}=0"),
             ("cache shard 1, between region files", f"{CACHE_PAUSE}=1"),
             ("cache shard 2, between region files", f"{CACHE_PAUSE}=2"),
             ("cache last shard, between region files", f"{CACHE_PAUSE}=3")]
    rng = random.Random(seed)
    out = hooks[:n]
    while len(out) < n:
        out.append(("random moment", f"after={rng.uniform(3.0, 14.0):.2f}"))
    return out


def sigkill_case(job: Path, work: Path, kind: str, spec: str, whole: dict) -> Result:
    """Kill a real distill at ``spec``, resume it, compare with the uninterrupted run."""
    case = Case("faults", f"SIGKILL: {kind}", "valid", spec)
    out = work / "out"
    if out.exists():
        shutil.rmtree(out)
    marker = work / "paused"
    marker.unlink(missing_ok=True)
    extra = {}
    delay = None
    if spec.startswith("after="):
        delay = float(spec.split("=")[1])
    else:
        name, value = spec.split("=", 1)
        extra[name] = f"{value}:{marker}"
    log = open(work / "killed.log", "w")
    proc = subprocess.Popen(command(job, out), stdout=log, stderr=subprocess.STDOUT, env=env(**extra))
    start = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                log.close()
                if delay is None and proc.returncode == 0:   # this code has no such hook (an older tree)
                    return Result(case, "skipped", "the pause hook never fired: the code under test lacks it")
                return Result(case, "success" if delay else "traceback",
                              f"the run ended (rc {proc.returncode}) before the kill" +
                              ("" if delay else ": " + (work / "killed.log").read_text()[-500:]))
            if (delay is not None and time.monotonic() - start >= delay) or (delay is None and marker.exists()):
                break
            if time.monotonic() - start > 300:
                return Result(case, "hang", "the writer never reached the pause point")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    shards, problem = verify_cache(out / "cache")
    if problem:
        return Result(case, "data lost", f"after the kill: {problem}")
    from graftfx.training import CheckpointStore

    resume = CheckpointStore(out / "stage1" / "checkpoint").latest() is not None
    res = run(command(job, out, *(["--resume"] if resume else [])), env())
    if res.returncode != 0:
        return Result(case, "traceback" if not one_line_error(res) else "wrongly refused",
                      f"the resumed run failed: {res.stderr[-600:]}")
    bad = differences(whole, outputs(out))
    _, problem = verify_cache(out / "cache")
    if problem:
        return Result(case, "data lost", problem)
    if bad:
        return Result(case, "silently wrong", "; ".join(bad))
    leftovers = [p.name for p in (out / "stage1" / "checkpoint").iterdir() if p.name.startswith(".")]
    if leftovers:
        return Result(case, "data lost", f"temporary folders left: {leftovers}")
    return Result(case, "success", f"resumed ({'--resume' if resume else 'rerun'}) equals the uninterrupted run; "
                                   f"{shards} shards verified after the kill")


def run_sigkills(work: Path, n: int, log=print) -> Tally:
    job = make_job(work / "job")
    base = work / "whole"
    res = run(command(job, base), env())
    assert res.returncode == 0, res.stderr[-3000:]
    whole = outputs(base)
    tally = Tally()
    for i, (kind, spec) in enumerate(kill_moments(n)):
        folder = work / f"kill-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        r = sigkill_case(job, folder, kind, spec, whole)
        if r.outcome != "skipped":
            tally.add(r)
        shutil.rmtree(folder, ignore_errors=True)
        log(f"  kill {i + 1}/{n} [{kind}, {spec}]: {r.outcome} {r.detail[:160]}")
    return tally


# ---------------------------------------------------------------------------------------------
# full disk
# ---------------------------------------------------------------------------------------------

def can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/graftfx-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], capture_output=True)
    probe.rmdir()
    return ok


class SmallDisk:
    """A tmpfs of ``size`` bytes mounted at ``path`` (root), grown later with ``grow``."""

    def __init__(self, path: Path, size: int):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)

    def grow(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def _fsize_limit(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # a write past the limit fails (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _phase(message: str) -> str:
    m = message.lower()
    if "cache" in m:
        return "cache write"
    if "checkpoint" in m and "stage" in m:
        return "checkpoint"
    if "stage1" in m or "stage 1" in m:
        return "stage 1 checkpoint"
    if "stage2" in m or "stage 2" in m:
        return "stage 2 checkpoint"
    if "export" in m or "grafted" in m:
        return "export"
    return "other"


def full_disk_case(job: Path, work: Path, size: int, whole: dict, mount: bool) -> Result:
    case = Case("faults", "full disk", "invalid", size)
    out = work / "disk" / "out"
    disk = SmallDisk(work / "disk", size) if mount else None
    try:
        if not mount:
            (work / "disk").mkdir(parents=True, exist_ok=True)
        res = run(command(job, out), env(), preexec_fn=None if mount else _fsize_limit(size))
        message = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
        if res.returncode == 0:
            case.kind = "full disk: no fault (fits)"
            bad = differences(whole, outputs(out))
            return Result(case, "silently wrong" if bad else "success", "; ".join(bad) or "the run fitted")
        if not one_line_error(res):
            case.kind = "full disk: " + _phase(res.stderr)
            return Result(case, "traceback", res.stderr[-700:])
        where = message
        for phase in ("cache", "stage1", "stage2", "grafted", "metrics"):
            if f"/{phase}" in where or f"cache {out / 'cache'}" in where:
                case.kind = {"cache": "full disk: cache write", "stage1": "full disk: stage 1",
                             "stage2": "full disk: stage 2", "grafted": "full disk: export",
                             "metrics": "full disk: metrics"}[phase]
                break
        else:
            case.kind = "full disk: " + _phase(where)
        if not any(w in where.lower() for w in ("space", "free", "too large")):
            return Result(case, "vague error", f"does not say the disk is full: {where}")
        shards, problem = verify_cache(out / "cache")
        if problem:
            return Result(case, "data lost", problem)
        from graftfx.training import CheckpointStore

        for stage in ("stage1", "stage2"):
            root = out / stage / "checkpoint"
            store = CheckpointStore(root)
            broken = [p.name for p in root.iterdir()] if root.is_dir() else []
            if broken and store.latest() is None and any(p.startswith("step-") for p in broken):
                return Result(case, "data lost", f"{stage}: step folders but none complete: {broken}")
            temps = [p for p in broken if p.startswith(".")]
            if temps:
                return Result(case, "data lost", f"{stage}: temporary folders left behind: {temps}")
        # room again: the same job continues and ends exactly like the uninterrupted one
        if mount:
            disk.grow(256 << 20)
        resume = CheckpointStore(out / "stage1" / "checkpoint").latest() is not None
        again = run(command(job, out, *(["--resume"] if resume else [])), env())
        if again.returncode != 0:
            return Result(case, "data lost", f"the rerun with room failed: {again.stderr[-500:]}")
        bad = differences(whole, outputs(out))
        if bad:
            return Result(case, "silently wrong", "; ".join(bad))
        return Result(case, "clean error", where)
    finally:
        if disk is not None:
            disk.close()
        shutil.rmtree(work / "disk", ignore_errors=True)


def footprint(folder: Path) -> int:
    """Bytes the files take on a tmpfs (each file rounded up to 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def run_full_disks(work: Path, n: int, log=print) -> Tally:
    job = make_job(work / "job")
    base = work / "whole"
    res = run(command(job, base), env())
    assert res.returncode == 0, res.stderr[-3000:]
    whole = outputs(base)
    mount = can_mount()
    total = footprint(base)
    cache, s1, s2, export = (footprint(base / d) for d in ("cache", "stage1", "stage2", "grafted"))
    largest = max(p.stat().st_size for p in base.rglob("*") if p.is_file())
    tally = Tally()
    rng = random.Random(1)
    if mount:
        # sizes aimed at each writer: the cache's own room check, mid-cache, stage 1, stage 2, export
        aimed = [cache // 2, int(cache * 0.97), cache + s1 // 2, cache + s1 + s2 // 3, cache + s1 + (2 * s2) // 3,
                 total - export // 2, total - 8192]
        sizes = aimed + sorted(rng.randrange(cache // 4, total) for _ in range(max(0, n - len(aimed))))
        sizes = [max(4096, x // 4096 * 4096) for x in sizes]
    else:
        # per-file size limits (RLIMIT_FSIZE): from below the smallest shard to just under the largest file
        sizes = sorted({int(largest * f) for f in [0.01, 0.1, 0.3, 0.6, 0.9, 0.99] +
                        [rng.uniform(0.01, 1.0) for _ in range(max(0, n - 6))]})
    for i, size in enumerate(sizes[:n]):
        folder = work / f"disk-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        r = full_disk_case(job, folder, size, whole, mount)
        tally.add(r)
        shutil.rmtree(folder, ignore_errors=True)
        log(f"  {'tmpfs' if mount else 'RLIMIT_FSIZE'} {size:,} bytes (run needs {total:,}): {r.case.kind}: "
            f"{r.outcome} {r.detail[:160]}")
    return tally


def export_command(job: Path, weights: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "graftfx", "export", str(job / "rules.toml"), "--model", str(job / "teacher.safetensors"),
            "--weights", str(weights), "--partial", "--out", str(out)]


def export_disk_case(job: Path, work: Path, weights: Path, want: bytes, how: str, size: int, mount: bool) -> Result:
    """A real ``graftfx export`` onto a full disk: ``how`` = "empty" (nothing there before) or
    "replace" (an earlier export there, which must survive byte for byte). Then room again: the
    same command must write exactly the export of an unconstrained run."""
    case = Case("faults", f"full disk: export ({how})", "invalid", size)
    root = work / "disk"
    disk = SmallDisk(root, size) if mount else None
    out = root / "out"
    try:
        root.mkdir(parents=True, exist_ok=True)
        cmd = export_command(job, weights, out)
        earlier = None
        if how == "replace":
            first = run(cmd, env())
            if first.returncode != 0:
                return Result(case, "traceback", f"the first export did not fit ({size:,} bytes): {first.stderr[-300:]}")
            earlier = {p.name: p.read_bytes() for p in out.iterdir()}
        res = run(cmd, env(), preexec_fn=None if mount else _fsize_limit(size))
        if res.returncode == 0:
            return Result(case, "silently wrong", f"exit 0 on a {size:,}-byte disk")
        if not one_line_error(res):
            return Result(case, "traceback", res.stderr[-700:])
        line = res.stderr.strip()
        if not any(w in line.lower() for w in ("space", "too large")) or str(out) not in line:
            return Result(case, "vague error", f"does not say the disk is full or where: {line}")
        if earlier is not None and {p.name: p.read_bytes() for p in out.iterdir()} != earlier:
            return Result(case, "data lost", f"the earlier export in {out} changed: {line}")
        left = [p.name for p in root.iterdir() if p.name != "out"]
        if left:
            return Result(case, "data lost", f"temporary files left beside --out: {left}")
        if mount:
            disk.grow(256 << 20)
        again = run(cmd, env())
        if again.returncode != 0:
            return Result(case, "data lost", f"the rerun with room failed: {again.stderr[-500:]}")
        if (out / "model.safetensors").read_bytes() != want:
            return Result(case, "silently wrong", "the rerun's model.safetensors differs from an unconstrained export")
        return Result(case, "clean error", line)
    finally:
        if disk is not None:
            disk.close()
        shutil.rmtree(root, ignore_errors=True)


def run_export_disks(work: Path, n: int = 3, log=print) -> Tally:
    """Full disks during ``graftfx export`` of a stage-1 run's checkpoint (stage 1 only is run)."""
    job = make_job(work / "job")
    base = work / "whole"
    cmd = command(job, base)
    cmd[cmd.index("--stage") + 1] = "1"
    res = run(cmd, env())
    assert res.returncode == 0, res.stderr[-3000:]
    weights = base / "stage1" / "checkpoint"
    ref = work / "ref"
    res = run(export_command(job, weights, ref), env())
    assert res.returncode == 0, res.stderr[-3000:]
    want = (ref / "model.safetensors").read_bytes()
    size = footprint(ref)
    mount = can_mount()
    if mount:
        plans = [("empty", size // 2), ("replace", size * 3 // 2), ("empty", size - 4096), ("replace", size * 2 - 8192)]
    else:
        largest = max(p.stat().st_size for p in ref.iterdir())
        plans = [("empty", largest // 2), ("empty", largest - 1), ("replace", largest // 3)]
    plans = [(how, max(4096, x // 4096 * 4096) if mount else x) for how, x in plans]
    tally = Tally()
    for i, (how, x) in enumerate(plans[:n]):
        folder = work / f"export-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        r = export_disk_case(job, folder, weights, want, how, x, mount)
        tally.add(r)
        shutil.rmtree(folder, ignore_errors=True)
        log(f"  {'tmpfs' if mount else 'RLIMIT_FSIZE'} {x:,} bytes (export needs {size:,}), {how}: {r.outcome} {r.detail[:200]}")
    return tally


# ---------------------------------------------------------------------------------------------
# cache corruption and two runs on one cache
# ---------------------------------------------------------------------------------------------

CORRUPTIONS = ("flip a byte in a shard", "truncate a shard", "delete a shard", "garbage index.json",
               "index names a file outside the folder", "swap two shards", "index shape changed",
               "index says incomplete", "index field of the wrong type", "empty shard file")


def corrupt(folder: Path, how: str) -> None:
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text())
    region = next(iter(index["shards"]))
    shard = folder / index["shards"][region][1]["file"]
    if how == "flip a byte in a shard":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x55
        shard.write_bytes(bytes(data))
    elif how == "truncate a shard":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif how == "delete a shard":
        shard.unlink()
    elif how == "garbage index.json":
        index_path.write_bytes(b"\x00{garbage")
    elif how == "index names a file outside the folder":
        index["shards"][region][1]["file"] = "../../outside.safetensors"
        (folder.parent.parent / "outside.safetensors").write_bytes(shard.read_bytes())
        index_path.write_text(json.dumps(index))
    elif how == "swap two shards":
        other = folder / index["shards"][region][2]["file"]
        a, b = shard.read_bytes(), other.read_bytes()
        shard.write_bytes(b)
        other.write_bytes(a)
    elif how == "index shape changed":
        index["regions"][region]["fields"]["input"][0] += 1
        index_path.write_text(json.dumps(index))
    elif how == "index says incomplete":
        index["complete"] = False
        index_path.write_text(json.dumps(index))
    elif how == "index field of the wrong type":
        index["shards"][region][0]["count"] = "six"
        index_path.write_text(json.dumps(index))
    else:
        shard.write_bytes(b"")


def run_corruptions(work: Path, log=print) -> Tally:
    """Each corruption of a complete cache, then the same distill job on it (stage 1 only): a
    clean error naming the cache (or, where the damage is to what a rerun rewrites, success)."""
    job = make_job(work / "job")
    tally = Tally()
    for how in CORRUPTIONS:
        out = work / f"c-{CORRUPTIONS.index(how)}"
        cmd = command(job, out)
        cmd[cmd.index("--stage") + 1] = "1"
        res = run(cmd, env())
        assert res.returncode == 0, res.stderr[-2000:]
        corrupt(out / "cache", how)
        again = run(cmd, env())
        case = Case("faults", f"cache corruption: {how}", "either", how, names=(str(out / "cache"),))
        if again.returncode == 0:
            shards, problem = verify_cache(out / "cache")
            outcome = "success" if not problem else "silently wrong"
            detail = f"rerun repaired/ignored it; {problem or f'{shards} shards verify'}"
            if how in ("flip a byte in a shard", "swap two shards", "index shape changed",
                       "index names a file outside the folder", "garbage index.json", "index field of the wrong type"):
                outcome, detail = "silently wrong", f"a damaged cache was used: {detail}"
        elif one_line_error(again):
            line = again.stderr.strip()
            outcome = "clean error" if str(out / "cache") in line else "vague error"
            detail = line
        else:
            outcome, detail = "traceback", again.stderr[-600:]
        tally.add(Result(case, outcome, detail))
        log(f"  {how}: {outcome} {detail[:160]}")
        shutil.rmtree(out, ignore_errors=True)
    return tally


def run_concurrent(work: Path, pairs: int = 9, variants=None, log=print) -> Tally:
    """Two distills started together on one --cache: same settings, another seed, another
    sample count. Neither may corrupt the cache or be told a false reason."""
    job = make_job(work / "job")
    tally = Tally()
    every = [("same settings", []), ("another --seed", ["--seed", "1"]), ("another --samples", ["--samples", "30"])]
    variants = [every[v] for v in variants] if variants is not None else every
    pairs = min(pairs, len(variants)) if variants is not every else pairs
    for i in range(pairs):
        kind, extra = variants[i % len(variants)]
        cache = work / f"shared-{i}" / "cache"
        outs = [work / f"shared-{i}" / "a", work / f"shared-{i}" / "b"]
        cmds = [command(job, outs[0], "--cache", str(cache), "--stage", "1"),
                command(job, outs[1], "--cache", str(cache), "--stage", "1", *extra)]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()) for c in cmds]
        results = [p.communicate(timeout=600) for p in procs]
        codes = [p.returncode for p in procs]
        errs = [r[1] for r in results]
        case = Case("faults", f"two runs on one cache: {kind}", "either", i)
        shards, problem = verify_cache(cache)
        if problem:
            outcome, detail = "data lost", problem
        elif kind == "same settings":
            same = codes == [0, 0] and not differences(outputs(outs[0]), outputs(outs[1]))
            outcome = "success" if same else ("traceback" if 0 not in codes else "silently wrong")
            detail = f"exit codes {codes}; {shards} shards verify" + ("" if same else f"; {errs[0][-300:]} {errs[1][-300:]}")
        else:
            ok = sorted(codes) == [0, 2]
            loser = errs[codes.index(2)] if 2 in codes else ""
            lines = [ln for ln in loser.splitlines() if ln.strip()]
            truthful = len(lines) == 1 and "written with another" in lines[0] and "corrupt" not in lines[0]
            outcome = "clean error" if ok and truthful else ("traceback" if 2 not in codes or len(lines) != 1
                                                            else "vague error")
            detail = f"exit codes {codes}: {lines[-1] if lines else errs}"
        tally.add(Result(case, outcome, detail))
        log(f"  pair {i + 1} ({kind}): {outcome} {detail[:200]}")
        shutil.rmtree(work / f"shared-{i}", ignore_errors=True)
    return tally


PARTS = ("sigkill", "disk", "corruption", "concurrent")


def run_all(work: Path, *, full: bool = True, log=print, parts=PARTS) -> Tally:
    tally = Tally()
    for name, fn in (("sigkill", lambda: run_sigkills(work / "kill", 24 if full else 3, log=log)),
                     ("disk", lambda: run_full_disks(work / "disk", 12 if full else 4, log=log)),
                     ("corruption", lambda: run_corruptions(work / "corrupt", log=log)),
                     ("concurrent", lambda: run_concurrent(work / "shared", 9 if full else 3, log=log))):
        if name not in parts:
            continue
        log(f"-- {name}")
        for r in fn().results:
            tally.add(r)
    return tally
