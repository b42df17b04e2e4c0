"""Generated rule files (tests/reliability/_harness.py): every one ends in success or a one-line
GraftError naming the file; none runs code, hangs, or is accepted while invalid. A seeded sample
here; GRAFTFX_RELIABILITY=full runs 10,000. Then the issue's cases one by one."""
import random

import pytest

from graftfx import GraftError, load_rules

from . import _harness as h

N = h.sample_size(10_000, 300)


def test_generated_rule_files_end_in_success_or_a_one_line_error(tmp_path):
    tally = h.run_rule_files(tmp_path, N, h.SEED)
    assert not tally.bad(), tally.summary()
    counts = tally.counts()
    assert counts["success"] > N // 20 and counts["clean error"] > N // 2, counts   # both kinds are exercised


def test_the_harness_catches_what_it_is_for(tmp_path, monkeypatch):
    """The classifier is not a rubber stamp: a loader that accepts everything is 'silently wrong',
    one that raises a bare exception a 'traceback', one that imports the operator 'code run'."""
    import graftfx.rules as rules

    runner = h.RuleFileRunner(tmp_path)
    rng = random.Random(5)
    cases = [runner.case(rng, i) for i in range(40)]
    invalid = next(c for c in cases if c.expect == "invalid")
    data = invalid.payload.read_bytes()
    monkeypatch.setattr(rules, "parse_rules", lambda *a, **k: (_ for _ in ()).throw(KeyError("x")))
    invalid.payload.write_bytes(data)
    assert runner.run(invalid).outcome == "traceback"
    monkeypatch.undo()
    path = tmp_path / "evil.toml"
    path.write_text('version = 1\n[[rule]]\npattern = "mlp"\noperator = "graftfx_evil_operator:Op"\n')
    case = h.Case("rule files", "import-path", "invalid", path, names=(str(path),))
    assert runner.run(case).outcome == "clean error" and not runner.sentinel.exists()
    monkeypatch.setattr(rules.Rule, "validate", lambda self, allow_imports=False: rules._import_operator(self.operator))
    assert runner.run(case).outcome == "code run"
    monkeypatch.undo()
    typed = tmp_path / "typed.toml"
    typed.write_text('version = 1\n[[rule]]\npattern = "mlp"\noperator = "mlp"\nselect = { every_other = true }\n')
    monkeypatch.setattr(rules.Select, "__post_init__", lambda self: None)
    case = h.Case("rule files", "type:select", "invalid", typed, names=(str(typed),))
    assert runner.run(case).outcome == "silently wrong"


def write(tmp_path, data):
    p = tmp_path / "r.toml"
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


RULE = 'version = 1\n[[rule]]\npattern = "mlp"\noperator = "mlp"\n'


@pytest.mark.parametrize("data, message", [
    pytest.param(bytes(range(256)) * 8, "not a text file (byte 128 is not UTF-8)", id="binary"),
    pytest.param(RULE.encode().replace(b"mlp", b"ml\xff", 1), "is not UTF-8", id="latin-1"),
    pytest.param(RULE + "options = { x = " + "[" * 500 + "1" + "]" * 500 + " }\n", "nested far too deeply", id="nest-500"),
    pytest.param(RULE + "options = { x = " + "[" * 20 + "1" + "]" * 20 + " }\n", "nested more than 8 levels deep",
                 id="nest-20"),
    pytest.param(RULE + "select = { indices = [" + "1" * 4301 + "] }\n", "Exceeds the limit (4300 digits)",
                 id="4301-digits"),
    pytest.param(RULE + "select = { indices = [" + "1" * 25 + "] }\n", "does not fit in 64 bits", id="25-digits"),
    pytest.param(RULE.replace('pattern = "mlp"', "pattern = 0"), "pattern must be a string, got 0", id="pattern-0"),
    pytest.param(RULE.replace('operator = "mlp"', "operator = 1"), "operator must be a string, got 1", id="operator-1"),
    pytest.param("version = 1\nrule = [1]\n", "a [[rule]] must be a table", id="rule-[1]"),
    pytest.param(RULE + "select = { fraction = [] }\n", "select.fraction must be a number in (0, 1], got []",
                 id="fraction-[]"),
    pytest.param(RULE + "select = { paths = [1] }\n", "select.paths must be a list of module-path globs", id="paths-[1]"),
    pytest.param(RULE + 'select = { every_other = "0" }\n', "select.every_other must be true or false, got '0'",
                 id="every_other-str"),
    pytest.param(RULE + "select = { every_other = true, offset = false }\n", "select.offset must be the integer 0 or 1",
                 id="offset-bool"),
    pytest.param(RULE + "select = { indices = [true] }\n", "select.indices must be a list of integers", id="indices-bool"),
    pytest.param(RULE + "select = { fraction = true }\n", "select.fraction must be a number", id="fraction-bool"),
    pytest.param(RULE.replace("version = 1", "version = true"), "version True is not supported (only the integer 1)",
                 id="version-true"),
    pytest.param(RULE.replace("version = 1", "version = 1.0"), "version 1.0 is not supported", id="version-float"),
    pytest.param("description = 5\n" + RULE, "description must be a string, got 5", id="description-int"),
    pytest.param(RULE + "name = 3\n", "name must be a string, got 3", id="name-int"),
    pytest.param(RULE + "loss = 2\n", "loss must be a string, got 2", id="loss-int"),
    pytest.param(RULE + 'options = "big"\n', "options must be a table, got 'big'", id="options-str"),
    pytest.param("description = \"" + "d" * (2 << 20) + "\"\n" + RULE, "more than a rule file may hold", id="2MB"),
    pytest.param("version = 1\n" + "".join(f'[[rule]]\npattern = "mlp"\noperator = "mlp"\nselect = {{ paths = ["{i}"] }}\n'
                                           for i in range(1100)), "1100 rules, more than 1024", id="1100-rules"),
    pytest.param(RULE + "options = { ratio = 1e300 }\n", "ratio must be a finite number > 0 of at most 1e+09", id="ratio-1e300"),
])
def test_the_issues_rule_files_are_one_line_errors_naming_the_file(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(GraftError) as e:
        load_rules(path)
    text = str(e.value)
    assert message in text and text.startswith(f"{path}: ") and "\n" not in text, text


def test_select_in_python_is_typed_strictly_too():
    from graftfx import Rule, Select

    for bad in (dict(every_other="0"), dict(offset=True), dict(fraction="0.5"), dict(indices=[1.0]), dict(paths=["a", 1])):
        with pytest.raises(ValueError):
            Select(**bad)
    with pytest.raises(ValueError, match="unknown select key 'colour'"):
        Rule("mlp", "mlp", {"colour": 1})
    assert Select(every_other=True, offset=0).offset == 0
    rule = Rule("mlp", "mlp", Select(every_other=True, offset=0))
    assert rule.to_dict()["select"] == {"every_other": True, "offset": 0}   # offset 0 used to be dropped


@pytest.mark.parametrize("options, message", [
    pytest.param('operator = "mlp"\npattern = "mlp"\noptions = { ratio = 10000 }',
                 "operator 'mlp' for blocks.1.mlp would hold 2.95G parameters, 2499x the 1.18M of the region it "
                 "replaces (ceiling 64x, GRAFTFX_MAX_PARAM_RATIO); lower its options (ratio=10000)", id="mlp-ratio-10000"),
    pytest.param('operator = "mamba2"\npattern = "self_attention"\noptions = { expand = 10000 }',
                 "operator 'mamba2' for blocks.1.attn would hold", id="mamba2-expand"),
    pytest.param('operator = "mha"\npattern = "self_attention"\noptions = { heads = 1, init = "fresh" }',
                 "heads=1 gives head dim 384 > 256", id="mha-heads-1"),
    pytest.param('operator = "swa"\npattern = "self_attention"\noptions = { heads = 3 }',
                 "init='copy' needs the original heads=6", id="swa-heads-3"),
    pytest.param('operator = "mamba2"\npattern = "self_attention"\noptions = { ngroups = 5 }', "ngroups", id="mamba2-ngroups"),
])
def test_options_refused_for_the_real_region_by_explain_and_inspect_before_anything_is_built(tmp_path, capsys, options,
                                                                                              message):
    """`explain` exits 2 (it used to exit 0 for these); `inspect --materialize` refuses before building."""
    from graftfx.cli import main

    path = write(tmp_path, 'version = 1\n[[rule]]\nname = "r"\nselect = { preset = "paper-50" }\n' + options + "\n")
    runs = [["explain", "DiT-S/8", "--rules", str(path)]]
    if "ratio" in options:  # a real model: refused before the 2.95G-parameter operators are built
        runs.append(["inspect", "DiT-S/8", "--materialize", "--rules", str(path)])
    for argv in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and f"{path}: rule 1 (r): " in err, err


def test_the_ceiling_is_configurable(tmp_path, monkeypatch):
    import graftfx
    from graftfx.models.zoo import resolve_model

    model, args, _ = resolve_model("DiT-S/8", meta=True)
    path = write(tmp_path, RULE + 'select = { preset = "paper-50" }\noptions = { ratio = 400 }\n')
    with pytest.raises(GraftError, match="100x the 1.18M of the region"):
        graftfx.graft(model, path, args)
    monkeypatch.setenv("GRAFTFX_MAX_PARAM_RATIO", "200")
    assert len(graftfx.graft(model, path, args).grafts) == 6
    monkeypatch.setenv("GRAFTFX_MAX_PARAM_RATIO", "lots")
    with pytest.raises(GraftError, match="GRAFTFX_MAX_PARAM_RATIO='lots' is not a number"):
        graftfx.graft(model, path, args)
