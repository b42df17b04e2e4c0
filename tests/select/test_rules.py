import pytest

import graftfx
from graftfx import GraftError, Rule, Select, load_rules
from graftfx.rules import builtin_rule_files, fraction_blocks, preset_blocks


def test_paper_layer_sets_for_dit_xl2():
    assert preset_blocks("paper-50", 28) == set(range(1, 28, 2))
    assert preset_blocks("paper-75", 28) == set(range(28)) - {0, 4, 8, 12, 16, 20, 24}
    assert len(preset_blocks("paper-75", 28)) == 21
    assert fraction_blocks(0.5, 28) == preset_blocks("paper-50", 28)
    assert fraction_blocks(1.0, 28) == set(range(28))
    assert len(fraction_blocks(0.25, 28)) == 7


def test_selection_keys_combine(tiny_dit):
    traced = graftfx.trace(tiny_dit, tiny_dit.example_inputs(2))

    def chosen(select):
        plan = graftfx.select(traced, [Rule("self_attention", "mha", select)])
        return [r.path for _, r in plan.selected]

    assert chosen(Select(every_other=True)) == ["blocks.1.attn", "blocks.3.attn"]
    assert chosen(Select(every_other=True, offset=0)) == ["blocks.0.attn", "blocks.2.attn"]
    assert chosen(Select(indices=[0, -1])) == ["blocks.0.attn", "blocks.3.attn"]
    assert chosen(Select(preset="paper-75")) == ["blocks.1.attn", "blocks.2.attn", "blocks.3.attn"]
    assert chosen(Select(paths=["blocks.[12].*"])) == ["blocks.1.attn", "blocks.2.attn"]
    assert chosen(Select(preset="paper-75", exclude=["blocks.2.*"])) == ["blocks.1.attn", "blocks.3.attn"]


def test_mlp_index_selection_skips_unnumbered_regions(tiny_dit):
    plan = graftfx.select(graftfx.trace(tiny_dit, tiny_dit.example_inputs(2)), [Rule("mlp", "mlp", Select(preset="all"))])
    assert [r.path for _, r in plan.selected] == [f"blocks.{i}.mlp" for i in range(4)]  # not t_embedder.mlp


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


GOOD = 'version = 1\n[[rule]]\npattern = "self_attention"\noperator = "mha"\nselect = { preset = "paper-50" }\n'


@pytest.mark.parametrize("text, message", [
    pytest.param(GOOD + "colour = 1\n", "unknown key 'colour'; valid keys: name, pattern, operator, select, options, loss", id="rule-key"),
    pytest.param("flavour = 2\n" + GOOD, "unknown top-level key 'flavour'; valid keys: version, description, model, rule", id="top-key"),
    pytest.param(GOOD.replace("self_attention", "self_atention"), "unknown pattern 'self_atention' (did you mean 'self_attention'?); valid choices:", id="pattern"),
    pytest.param(GOOD.replace('"mha"', '"mhaa"'), "unknown operator 'mhaa' (did you mean 'mha'?); valid choices:", id="operator"),
    pytest.param(GOOD + "options = { init = \"copy\", wide = 2 }\n", "unknown option 'wide' for operator 'mha'; valid options: heads, init", id="option"),
    pytest.param(GOOD + "options = { init = \"zeros\" }\n", "init must be one of copy, fresh, got 'zeros'", id="option-value"),
    pytest.param(GOOD.replace("paper-50", "paper-60"), "select.preset 'paper-60' is not one of paper-50, paper-75, all", id="preset"),
    pytest.param(GOOD.replace("preset", "pres"), "unknown select key 'pres'; valid keys: preset, fraction", id="select-key"),
    pytest.param(GOOD.replace('"mha"', '"os:system"'), "is an import path; rule files never import code", id="import-path"),
    pytest.param("version = 1\n", "no [[rule]] tables", id="empty"),
    pytest.param("[[rule]\n", "not valid TOML", id="syntax"),
])
def test_rule_file_errors_name_file_key_and_choices(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(GraftError) as e:
        load_rules(path)
    assert message in str(e.value)
    assert str(e.value).startswith(f"{path}: "), "a rule-file error names the file first"
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("table, message", [
    pytest.param('select = { indices = [9] }', "select.indices [9] out of range for a model with 4 blocks", id="indices"),
    pytest.param('select = { preset = "all" }\noptions = { heads = 3 }', "heads=3 must divide the width 64", id="heads"),
    pytest.param('select = { preset = "all" }\noptions = { init = "copy", heads = 2 }',
                 "init='copy' needs the original heads=4", id="copy-heads"),
])
def test_errors_found_against_the_model_name_file_rule_and_region(tmp_path, tiny_dit, table, message):
    # Options that pass validation alone but fail for a real region (the swa heads=5 on
    # a width-384 model): a GraftError naming the file, the rule and the region, never a ValueError.
    path = write(tmp_path, 'version = 1\n[[rule]]\nname = "a"\npattern = "self_attention"\noperator = "swa"\n' + table + "\n")
    with pytest.raises(GraftError) as e:
        graftfx.graft(tiny_dit, path, tiny_dit.example_inputs(2))
    text = str(e.value)
    assert message in text and text.startswith(f"{path}: rule 1 (a): ")
    if "indices" not in message:
        assert "blocks.0.attn" in text and "set the heads option" in text or "use init='fresh'" in text


def test_import_path_only_with_explicit_opt_in(tmp_path):
    path = write(tmp_path, GOOD.replace('"mha"', '"graftfx.rewrites.operators.mlp:MLP"').replace("self_attention", "mlp"))
    with pytest.raises(GraftError, match="allow_imports=True"):
        load_rules(path)
    rules = load_rules(path, allow_imports=True)
    assert rules.rules[0].operator == "graftfx.rewrites.operators.mlp:MLP"


def test_bundled_rule_files_one_per_paper_experiment():
    files = builtin_rule_files()
    for op in ("hyena_se", "hyena_x", "hyena_y", "swa", "mamba2"):
        assert f"dit-xl2-mha-{op}-50p.toml" in files and f"dit-xl2-mha-{op}-75p.toml" in files
    for exp in ("r3", "r6", "hyena_x"):
        assert f"dit-xl2-mlp-{exp}-50p.toml" in files and f"dit-xl2-mlp-{exp}-75p.toml" in files
    for name, path in files.items():
        rules = load_rules(path)  # validates pattern, operator and options
        assert rules.description and len(rules) >= 1, name


def test_bundled_file_by_name_and_digest_is_stable():
    a = load_rules("dit-xl2-mha-swa-50p.toml")
    b = load_rules("dit-xl2-mha-swa-50p.toml")
    assert a.digest() == b.digest() and a.digest() != load_rules("dit-xl2-mha-swa-75p.toml").digest()
