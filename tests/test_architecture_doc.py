"""docs/architecture.md's worked example, run literally: its Python block defines and registers an
operator, its TOML block is a rule file for it, and both work as the page says."""
import json
import re
from pathlib import Path

import pytest
import torch

import graftfx
from graftfx.registry import OPERATORS, get_operator

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def blocks(language: str) -> list[str]:
    example = DOC.read_text(encoding="utf-8").split("## How to add an operator", 1)[1]
    return re.findall(rf"```{language}\n(.*?)```", example, re.S)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    (code,), (toml,) = blocks("python"), blocks("toml")
    namespace = {"__name__": "architecture_doc_example"}
    exec(compile(code, str(DOC), "exec"), namespace)           # exactly the page's code
    rules = tmp_path_factory.mktemp("doc") / "pooled.toml"
    rules.write_text(toml)
    yield namespace, rules
    OPERATORS.pop("pooled_attention", None)


def test_the_example_registers_an_operator(example):
    namespace, _ = example
    spec = get_operator("pooled_attention")
    assert spec.cls is namespace["PooledAttention"] and spec.config is namespace["PooledAttentionConfig"]
    assert spec.kinds == ("self_attention",) and spec.loss == "l1" and spec.option_names() == ["heads", "init", "pool"]
    with pytest.raises(graftfx.GraftError, match="pool must be an integer >= 1, got 0"):
        spec.make_config({"pool": 0})


def test_pool_1_with_copied_weights_is_the_original_attention(example, tiny_dit):
    x = tiny_dit.example_inputs(3)
    rule = graftfx.Rule("self_attention", "pooled_attention", graftfx.Select(preset="all"), {"pool": 1})
    grafted = graftfx.graft(tiny_dit, [rule], tiny_dit.example_inputs(2))
    assert len(grafted.grafts) == 4
    with torch.no_grad():
        torch.testing.assert_close(grafted(*x), tiny_dit(*x), rtol=1e-5, atol=1e-5)


def test_the_rule_file_grafts_what_the_page_says(example, tiny_dit, tmp_path):
    _, rules = example
    grafted = graftfx.graft(tiny_dit, rules, tiny_dit.example_inputs(2))
    assert [g.region.path for g in grafted.grafts] == ["blocks.1.attn", "blocks.3.attn"]
    op = grafted.get_submodule("blocks.1.attn")
    assert op.config.pool == 4 and grafted.grafts[0].config == {"heads": None, "init": "copy", "pool": 4}
    # the operator's math, written out independently: keys/values averaged over 4-token groups
    h = torch.randn(2, 16, 64)
    with torch.no_grad():
        q, k, v = (t.view(2, 16, 4, 16).transpose(1, 2) for t in op.qkv(h).chunk(3, -1))    # (B, H, L, Dh)
        k, v = (t.reshape(2, 4, 4, 4, 16).mean(3) for t in (k, v))                            # (B, H, L/4, Dh)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 16 ** 0.5, -1)
        want = op.proj((attn @ v).transpose(1, 2).reshape(2, 16, 64))
        torch.testing.assert_close(op(h), want, rtol=1e-5, atol=1e-6)
    assert op.flops(16) == 2 * 16 * 64 * 192 + 2 * 16 * 64 * 64 + 4 * 16 * 4 * 64
    # shipped and reloaded: the manifest's config rebuilds the same model
    x = tiny_dit.example_inputs(3)
    graftfx.export_grafted(grafted, tmp_path / "shipped")
    again = graftfx.load_grafted(tiny_dit, tmp_path / "shipped")
    with torch.no_grad():
        assert torch.equal(again(*x), grafted(*x))


def test_the_bench_and_distillation_take_it_without_being_told(example, tiny_dit, tmp_path):
    from graftfx.bench.cases import operator_cases
    from graftfx.distill import DistillSettings, Stage1Config, run_distill

    cases, _ = operator_cases(["pooled_attention"])
    assert [(c.op, c.kind) for c in cases] == [("pooled_attention", "self_attention")]
    _, rules = example
    data = torch.randn(32, 4, 8, 8), torch.randint(0, 10, (32,))
    settings = DistillSettings(stage="1", online=True, samples=16, export=False,
                               stage1=Stage1Config(steps=30, batch_size=16, lr=2e-3, log_every=1))
    torch.manual_seed(0)
    result = run_distill(tiny_dit, tiny_dit.example_inputs(2), rules, *data, tmp_path, settings, progress=False,
                         log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines() if line]
    losses = [r["loss/blocks.1.attn"] for r in rows]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert len(losses) == 30 and last < 0.8 * first, losses
    assert set(result.stage1["losses"]) == {"blocks.1.attn", "blocks.3.attn"}
