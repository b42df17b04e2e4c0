"""Generated argument lists through ``graftfx.cli.main`` (tests/reliability/_harness.py): exit 0,
or exit 2 with exactly one line naming the argument; no traceback, no hang, nothing written
outside --out, no pickle run. A seeded sample here (GRAFTFX_RELIABILITY=full: 2,000 lists);
then the issue's cases."""
import pytest

from graftfx.cli import main

from . import _harness as h


def test_generated_argument_lists_exit_0_or_2_with_one_line(tmp_path):
    tally = h.run_cli(tmp_path, h.sample_size(2000, 60), h.SEED)
    assert not tally.bad(), tally.summary()
    counts = tally.counts()
    assert counts["success"] >= 3 and counts["clean error"] >= 30, counts


def cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.err


@pytest.mark.parametrize("argv, message", [
    pytest.param(["distill", "digits-mha-hyena_x-50p.toml", "--model", "digits", "--out", ""],
                 "--out is empty; give an output folder", id="out-empty"),
    pytest.param(["distill", "digits-mha-hyena_x-50p.toml", "--model", "digits", "--out", "o", "--device", "ALL"],
                 "--device 'ALL' is not a device; use cpu, cuda or cuda:N", id="device-ALL"),
    pytest.param(["distill", "digits-mha-hyena_x-50p.toml", "--model", "digits", "--out", "o", "--device", "meta"],
                 "--device meta: graftfx trains and evaluates on cpu or cuda", id="device-meta"),
    pytest.param(["distill", "digits-mha-hyena_x-50p.toml", "--model", "digits", "--out", "o", "--lr1", "nan"],
                 "--lr1 nan: must be a finite number > 0", id="lr-nan"),
    pytest.param(["distill", "digits-mha-hyena_x-50p.toml", "--model", "digits", "--out", "o", "--samples", "0"],
                 "--samples 0: must be an integer >= 1", id="samples-0"),
    pytest.param(["distill", "digits-mha-hyena_x-50p.toml", "--model", "digits", "--out", "o", "--seed", "-1"],
                 "--seed -1: must be an integer >= 0", id="seed"),
    pytest.param(["distill", "digits-mha-hyena_x-50p.toml", "--model", "INT64", "--out", "o"],
                 "holds int64 tensors", id="int-checkpoint"),
    pytest.param(["inspect", "DiT-XL/2", "--materialize", "--rules", "missing.toml"], "rule file missing.toml not found",
                 id="materialize-missing-rules"),
    pytest.param(["inspect", "DiT-S/8", "--out", ""], "--out is empty", id="inspect-out-empty"),
    pytest.param(["study", "BINARY", "--out", "o"], "not a text file", id="binary-study"),
    pytest.param(["export", "digits-mha-hyena_x-50p.toml", "--model", "digits", "--weights", "NOMATCH", "--partial",
                  "--out", "o"], "holds none of this grafted model's", id="partial-zero-keys"),
    pytest.param(["export", "digits-mha-hyena_x-50p.toml", "--model", "digits", "--weights", "INTWEIGHTS", "--partial",
                  "--out", "o"], "keys of the wrong dtype", id="partial-int64"),
    pytest.param(["eval", "digits", "--steps", "ddim0", "--n-per-class", "1"], "--steps ddim0:", id="eval-steps"),
    pytest.param(["distill", "--frobnicate"], "graftfx distill: error: the following arguments are required", id="argparse-one-line"),
    pytest.param([], "graftfx: error: no COMMAND given; choose one of inspect, explain", id="no-command"),
    pytest.param(["eval"], "graftfx eval: error: no EVAL_COMMAND given; choose one of train-classifier", id="eval-no-command"),
    pytest.param(["nosuchcommand"], "invalid choice: 'nosuchcommand'", id="unknown-command"),
    pytest.param(["-x"], "unrecognized arguments: -x", id="bad-global-flag"),
])
def test_the_issues_argument_lists(argv, message, tmp_path, capsys, monkeypatch):
    import time

    import torch
    from safetensors.torch import save_file

    from graftfx.models import load_bundled_digits_dit

    monkeypatch.chdir(tmp_path)
    sd = load_bundled_digits_dit().state_dict()
    files = {"INT64": tmp_path / "int.safetensors", "BINARY": tmp_path / "s.toml",
             "NOMATCH": tmp_path / "w.safetensors", "INTWEIGHTS": tmp_path / "wi.safetensors"}
    save_file({k: (v * 10).long() for k, v in sd.items()}, str(files["INT64"]))
    files["BINARY"].write_bytes(bytes(range(256)) * 4)
    save_file({"no.such.key": torch.zeros(2)}, str(files["NOMATCH"]))
    import graftfx

    model = load_bundled_digits_dit()
    g = graftfx.graft(model, "digits-mha-hyena_x-50p.toml", model.example_inputs(2))
    name, p = next(iter(g.spliced_named_parameters()))
    save_file({name: (p.detach() * 100).long()}, str(files["INTWEIGHTS"]))
    argv = [str(files[a]) if a in files else a for a in argv]
    start = time.perf_counter()
    code, err = cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files.values()), \
        "something was written into the working folder"
    if "materialize" in argv:
        assert time.perf_counter() - start < 5, "the rule file is checked before 675M parameters are built"


def test_the_cli_classifier_is_not_a_rubber_stamp(tmp_path, monkeypatch):
    import graftfx.cli as cli_module

    runner = h.CliRunner.__new__(h.CliRunner)      # no fixtures needed for these three
    runner.sentinel = tmp_path / "CODE_RAN"
    case_dir = tmp_path / "case"
    case_dir.mkdir()

    def outcome(fake, expect="invalid"):
        monkeypatch.setattr(cli_module, "main", fake)
        return runner.run(h.Case("cli", "x", expect, (["x"], case_dir, []), names=("x",))).outcome

    def two_lines(argv):
        import sys
        print("graftfx x: error: x\nmore", file=sys.stderr)
        return 2

    def litter(argv):
        (case_dir / "stray.txt").write_text("oops")
        return 0

    assert outcome(lambda argv: 1 / 0) == "traceback"
    assert outcome(two_lines) == "traceback"
    assert outcome(lambda argv: 0) == "silently wrong"
    assert outcome(litter, expect="valid") == "silently wrong"


def test_export_partial_with_a_rule_file_equal_to_the_training_one_is_valid(tmp_path, capsys):
    """The 5 'exit 0 for an invalid argument list' findings of the first after.json: stage-1
    weights trained for digits-mha-hyena_x-50p.toml, exported with good.toml, the same rule under
    another name. The export is right (every key fits, the weights land in the model): the
    classifier was wrong, and now labels only that pairing valid."""
    import torch
    from safetensors.torch import load_file, save_file

    import graftfx
    from graftfx.models import load_bundled_digits_dit

    good = tmp_path / "good.toml"
    good.write_text('version = 1\n[[rule]]\npattern = "self_attention"\noperator = "hyena_x"\n'
                    'select = { preset = "paper-50" }\n')
    model = load_bundled_digits_dit()
    g = graftfx.graft(model, "digits-mha-hyena_x-50p.toml", model.example_inputs(2))
    trained = {n: p.detach() + 0.25 for n, p in g.spliced_named_parameters()}
    save_file(trained, str(tmp_path / "w.safetensors"))
    code, err = cli(["export", str(good), "--model", "digits", "--weights", str(tmp_path / "w.safetensors"),
                     "--partial", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(exported[n], t) for n, t in trained.items() if n in exported)
    assert sum(n in exported for n in trained) == len(trained)

    runner = h.CliRunner.__new__(h.CliRunner)
    runner.f, runner.stage1 = tmp_path, tmp_path / "run" / "stage1" / "checkpoint"
    ckpt = (str(runner.stage1), "valid")
    assert runner.weights_label([str(good)], ckpt) == ckpt
    assert runner.weights_label(["digits-mha-hyena_x-50p.toml"], ckpt) == ckpt
    for other in ([str(tmp_path / "heads5.toml")], [str(tmp_path / "absurd.toml")], ["nope.toml"], [""]):
        assert runner.weights_label(other, ckpt) == (ckpt[0], "invalid"), other
    assert runner.weights_label(["nope.toml"], ("x.safetensors", "valid")) == ("x.safetensors", "valid")


def test_the_classifier_still_flags_an_export_that_ignores_wrong_weights(tmp_path, monkeypatch):
    """An export that accepted stage-1 weights with a rule file they were not trained for (exit 0)
    is still 'silently wrong' to the classifier."""
    import graftfx.cli as cli_module

    runner = h.CliRunner.__new__(h.CliRunner)
    runner.sentinel, runner.f = tmp_path / "CODE_RAN", tmp_path
    runner.stage1 = tmp_path / "stage1"
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    rules = [str(tmp_path / "heads5.toml")]
    weights, label = runner.weights_label(rules, (str(runner.stage1), "valid"))
    argv = ["export", *rules, "--model", "digits", "--out", str(case_dir / "out"), "--weights", weights, "--partial"]
    monkeypatch.setattr(cli_module, "main", lambda argv: 0)
    r = runner.run(h.Case("cli", "export", label, (argv, case_dir, []), names=tuple(rules)))
    assert r.outcome == "silently wrong", r
