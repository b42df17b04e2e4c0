"""graftfx.training.loop.run_steps and Metrics: the order of steps, logs and checkpoints every
trainer shares; the divergence stop; metrics truncated on resume."""
import pytest

from graftfx.errors import GraftError
from graftfx.training import CheckpointStore, Metrics, run_steps


def _loop(tmp_path, start, total, values=lambda i: {"loss": 1.0 / (i + 1)}, **kw):
    events = []
    store = CheckpointStore(tmp_path / "ck")

    def step(i):
        events.append(("step", i))
        return values(i)

    def log(done, window):
        events.append(("log", done, len(window)))
        return " ".join(f"{k}={v:.3g}" for k, v in window[-1].items())

    def checkpoint(done):
        events.append(("ckpt", done))
        store.save(done, tensors={"w": {}})

    args = dict(log_every=2, ckpt_every=3, hint="lower the lr", progress=False)
    args.update(kw)
    last = run_steps("toy", start=start, total=total, step=step, log=log, checkpoint=checkpoint, store=store, **args)
    return events, last


def test_logs_every_n_checkpoints_every_m_and_at_the_end(tmp_path):
    events, last = _loop(tmp_path, 0, 7)
    assert [e for e in events if e[0] != "step"] == [
        ("log", 2, 2), ("log", 3, 1), ("ckpt", 3), ("log", 4, 1), ("log", 6, 2), ("ckpt", 6), ("log", 7, 1), ("ckpt", 7)]
    assert [e[1] for e in events if e[0] == "step"] == list(range(7)) and last == {"loss": 1 / 7}


def test_a_resumed_loop_starts_at_its_step_and_logs_alike(tmp_path):
    whole, _ = _loop(tmp_path / "a", 0, 7)
    resumed, _ = _loop(tmp_path / "b", 3, 7)         # from the checkpoint of step 3
    assert resumed == whole[whole.index(("ckpt", 3)) + 1:]
    assert _loop(tmp_path / "c", 7, 7) == ([], {})   # nothing left to do


def test_a_non_finite_value_stops_naming_it_the_step_and_the_last_good_checkpoint(tmp_path):
    def values(i):
        return {"loss/a": 1.0, "loss/b": float("nan") if i == 4 else 2.0, "grad_norm": float("inf") if i == 4 else 1.0}

    with pytest.raises(GraftError) as e:
        _loop(tmp_path, 0, 7, values=values)
    assert str(e.value) == (f"toy diverged in step 5: loss/b = nan, grad_norm = inf; the last good checkpoint "
                            f"(step 3) is kept in {tmp_path / 'ck' / 'step-0000003'}; fix: lower the lr")
    assert CheckpointStore(tmp_path / "ck").steps() == [3]    # no checkpoint after the divergence
    with pytest.raises(GraftError, match=r"toy diverged in step 1: loss = nan; no checkpoint was written yet in "):
        _loop(tmp_path / "x", 0, 3, values=lambda i: {"loss": float("nan")})


def test_metrics_start_empty_or_truncated_to_the_resumed_step(tmp_path):
    m = Metrics(tmp_path / "sub" / "metrics.jsonl")
    m.start(None)
    for step in (1, 2, 3, 4):
        m.log({"step": step, "loss": step / 10})
    m.start(2)
    assert m.read() == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}]
    m.start(None)
    assert m.read() == [] and m.path.read_text() == ""
