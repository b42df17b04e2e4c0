"""``graftfx explain MODEL`` on each zoo model by its CLI spec (graftfx.models.zoo): every
attention region is listed as selected, and every attention core it did not match is named with
the reason (the same near misses as the Python API's ``analyse``).

Every timm and transformers spec, and the diffusers models with a near miss (HunyuanDiT's
pooler) or joint streams (SD3); the other diffusers models go through the same resolver, and
``test_zoo`` checks every model's regions and misses through the Python API (the CLI's
``explain`` prints exactly those records)."""
import pytest

from graftfx.cli import main
from graftfx.rewrites.patterns.attention import analyse

from ._torchvision import import_timm
from .zoo import ATTENTION_KINDS, CLIENTS, regions_by_kind, traced

SPECS = [n for n in CLIENTS if n.split(":")[0] in ("timm", "transformers") and "-" not in n] + [
    "diffusers:hunyuan", "diffusers:sd3"]


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in SPECS])
def test_explain_by_cli_spec_lists_every_region_and_names_every_miss(name, tmp_path, capsys):
    client = CLIENTS[name]
    if not client.available():
        pytest.skip(f"{client.library} is not installed")
    if client.library == "timm":
        import_timm()                     # the CLI's `import timm` then finds it imported
    _, _, tg = traced(name)               # the same structure (the CLI's weights are not randomised)
    kinds = [k for k in regions_by_kind(tg) if k in ATTENTION_KINDS]
    rules = tmp_path / "r.toml"
    rules.write_text("".join(f'[[rule]]\npattern = "{k}"\noperator = "mha"\nselect = {{ paths = ["*"] }}\n'
                             for k in kinds))
    assert main(["explain", name, "--rules", str(rules)]) == 0
    text = capsys.readouterr().out
    regions, misses = analyse(tg)
    selected = {p.strip() for line in text.splitlines() if line.strip().startswith("selected:")
                for p in line.split(":", 1)[1].split(",")}
    assert selected == {r.path for r in regions}
    if misses:
        assert f"attention cores not matched ({len(misses)}):" in text
        for miss in misses:
            assert f"{miss.path}: {miss.reason}" in text
    else:
        assert "attention cores not matched" not in text


@pytest.mark.parametrize("spec, names", [("transformers:nope", "config.json"), ("timm:", "model name"), ("timm:no_such_net", "Unknown model"),
                                         ("diffusers:nope", "config.json")])
def test_unknown_specs_are_one_line_errors(spec, names, tmp_path, capsys):
    if spec.startswith("timm"):
        import_timm()
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\npattern = "self_attention"\noperator = "mha"\n')
    assert main(["explain", spec, "--rules", str(rules)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and spec in err and names in err
