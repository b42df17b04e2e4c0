"""The command line: --help everywhere, exit 2 with one line for user errors."""
import subprocess
import sys

import pytest

from graftfx.cli import COMMANDS, _register_extensions, main


def run(*argv):
    return subprocess.run([sys.executable, "-m", "graftfx", *argv], capture_output=True, text=True)


def test_help_lists_and_explains_every_command():
    res = run("--help")
    assert res.returncode == 0
    _register_extensions()
    for name in COMMANDS:
        assert name in res.stdout


@pytest.mark.parametrize("name", ["inspect", "explain", "rules"])
def test_every_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out.splitlines()) > 4


@pytest.mark.parametrize("argv, message", [
    pytest.param(["inspect", "DiT-Q/2"], "unknown model 'DiT-Q/2'; valid: DiT-XL/2", id="model"),
    pytest.param(["explain", "DiT-S/2", "--rules", "missing.toml"], "rule file missing.toml not found", id="rules"),
    pytest.param(["inspect", "nope.pt"], "checkpoint nope.pt not found", id="checkpoint"),
])
def test_user_errors_exit_2_with_one_line(argv, message):
    res = run(*argv)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and message in res.stderr and "Traceback" not in res.stderr


def cli(argv, capsys):
    """main() in this process: (exit code, stdout, stderr); argparse's exits count too."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


SWA_HEADS_5 = 'version = 1\n[[rule]]\nname = "five"\npattern = "self_attention"\noperator = "swa"\n' \
              'select = { preset = "paper-50" }\noptions = { heads = 5 }\n'


@pytest.mark.parametrize("argv, message", [
    pytest.param(["inspect", "DiT-S/8", "--frobnicate"], "unrecognized arguments: --frobnicate", id="flag"),
    pytest.param(["distill", "x.toml", "--model", "digits", "--out", "o", "--steps1", "many"],
                 "argument --steps1: invalid int value: 'many'", id="int"),
    pytest.param(["bench", "--op", "swaa"], "--op 'swaa' is not a registered operator (did you mean 'swa'?)", id="op"),
    pytest.param(["inspect", "DiT-S/2", "--rules", "RULES"], "RULES: rule 1 (five): operator 'swa' cannot replace "
                 "blocks.1.attn", id="inspect-region"),
    pytest.param(["explain", "DiT-S/2", "--rules", "RULES"], "heads=5 must divide the width 384; set the heads "
                 "option to a divisor of 384 (and 5 more above)", id="explain-region"),
    pytest.param(["inspect", "GARBAGE"], "is not a readable safetensors file", id="garbage-checkpoint"),
])
def test_user_mistakes_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    # The case among them: swa heads=5 on a width-384 model passes validation alone and
    # fails only against a real region; explain used to exit 0 on it.
    rules = tmp_path / "five.toml"
    rules.write_text(SWA_HEADS_5)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    argv = [str(rules) if a == "RULES" else str(garbage) if a == "GARBAGE" else a for a in argv]
    code, _, err = cli(argv, capsys)
    message = message.replace("RULES", str(rules))
    assert code == 2, err
    assert err.count("\n") == 1 and message in err, err


def test_inspect_writes_report(tmp_path, capsys):
    assert main(["inspect", "DiT-S/8", "--rules", "dit-xl2-mlp-r3-50p.toml", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rule mlp-mlp: matched 12, selected 6" in out      # 12 token MLPs (t_embedder's is no token MLP)
    assert (tmp_path / "report.html").exists() and (tmp_path / "after.svg").exists()


def test_distill_help_documents_every_flag():
    res = run("distill", "--help")
    assert res.returncode == 0
    for flag in ("--model", "--data", "--out", "--stage", "--cache", "--online", "--resume", "--samples", "--steps1",
                 "--steps2", "--train", "--objective", "--loss"):
        assert flag in res.stdout, flag


@pytest.mark.parametrize("argv, message", [
    pytest.param(["distill", "dit-xl2-mha-swa-50p.toml", "--model", "DiT-S/8", "--data", "nope.bin", "--out", "/tmp/x"],
                 "data 'nope.bin' is neither 'digits' nor a file", id="data"),
    pytest.param(["distill", "dit-xl2-mha-swa-50p.toml", "--model", "DiT-S/8", "--out", "/tmp/x", "--cache", "a",
                  "--online"], "not allowed with argument", id="cache-online"),
])
def test_distill_bad_input_exits_2(argv, message):
    res = run(*argv)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
