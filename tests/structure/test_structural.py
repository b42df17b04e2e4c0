"""Structural rewrites: the block pattern, parallel pairs, merged and dropped blocks, as rules.

Every check compares values against an eager, hand-written computation with the same weights.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import graftfx
from graftfx.errors import GraftError
from graftfx.match import match
from graftfx.models import DiT, DiTConfig, DiT_models
from graftfx.models.dit import modulate
from graftfx.rules import Rule, load_rules

from ..conftest import _activate  # non-zero adaLN: a parallel pair then differs from the sequential one


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return _activate(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4,
                                   num_heads=2, num_classes=10)))


# -- eager references ----------------------------------------------------------------------------

def _attn(block, s, h, attn=None):
    return s[2].unsqueeze(1) * (attn or block.attn)(modulate(block.norm1(h), s[0], s[1]))  # (N, T, D)


def _mlp(block, s, h):
    return s[5].unsqueeze(1) * block.mlp(modulate(block.norm2(h), s[3], s[4]))              # (N, T, D)


def parallel_block(b1, b2, x, c, attn1=None, attn2=None):
    """The documented parallel form: h = x + a_i(x) + a_i+1(x); y = h + m_i(h) + m_i+1(h)."""
    s1, s2 = b1.adaLN_modulation(c).chunk(6, dim=1), b2.adaLN_modulation(c).chunk(6, dim=1)
    h = x + _attn(b1, s1, x, attn1) + _attn(b2, s2, x, attn2)                              # (N, T, D)
    return h + _mlp(b1, s1, h) + _mlp(b2, s2, h)                                           # (N, T, D)


def run_model(model, x, t, y, body):
    """The DiT's forward with the block loop replaced by ``body(h, c)``."""
    h = model.x_embedder(x) + model.pos_embed                                              # (N, T, D)
    c = model.t_embedder(t) + model.y_embedder(y, False)                                   # (N, D)
    return model.unpatchify(model.final_layer(body(h, c), c))


def _inputs(model, batch, seed):
    torch.manual_seed(seed)
    return model.example_inputs(batch)


# -- the block pattern ------------------------------------------------------------------------------

def test_block_pattern_reads_the_residual_structure_of_graftfx_dit(small):
    traced = graftfx.trace(small, small.example_inputs(2))
    report = match(traced, "block")
    assert [b.path for b in report.regions] == [f"blocks.{i}" for i in range(4)] and not report.near_misses
    b0, b1 = report.regions[:2]
    assert b0.stages == ("self_attention", "mlp") and b1.input is b0.output
    attn, mlp = b0.branches
    assert attn.region.path == "blocks.0.attn" and mlp.region.path == "blocks.0.mlp"
    assert attn.stream is b0.input and mlp.stream is attn.residual and mlp.residual is b0.output
    assert attn.entry.target == "blocks.0.norm1" and mlp.entry.target == "blocks.0.norm2"   # x -> norm -> modulate
    # conditioning: c = t_embedder(t) + y_embedder(y), read from outside, as one named input
    (name, c), = b0.extra_inputs.items()
    assert name == "cond" and [a.target for a in c.all_input_nodes] == ["t_embedder.mlp.2", "y_embedder.embedding_table"]
    assert any(n.target == "blocks.0.adaLN_modulation.1" for n in b0.nodes)   # the adaLN chain is the block's
    assert b0.params == sum(p.numel() for p in small.blocks[0].parameters())


@pytest.mark.parametrize("kind,stages,extras", [
    ("pixart", ("self_attention", "cross_attention", "mlp"), {"cond", "context"}),
    ("dit", ("self_attention", "mlp"), {"timestep", "class_labels"}),
])
def test_block_pattern_finds_every_diffusers_block(kind, stages, extras):
    from graftfx.models.zoo import small_diffusers_inputs

    from ..clients.zoo import traced as zoo_traced      # one export trace per process, shared with tests/clients

    _, model, traced = zoo_traced(f"diffusers:{kind}")
    assert traced.tracer == "export"
    blocks = match(traced, "block").regions
    assert [b.path for b in blocks] == [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    assert all(b.stages == stages and set(b.extra_inputs) == extras for b in blocks)
    assert all(len(b.details["scalars"]) == 1 for b in blocks)          # export's batch size, recomputed from x
    # Parallel pairs run there too, at another batch size than traced. Wiring check: with the second
    # block of each pair silenced (its branches' output projections zero, so its updates are 0) the
    # parallel pair is the sequential pair exactly; any stage of the first block wired to the wrong
    # stream, or conditioning passed wrongly, would show. The shared model is restored afterwards.
    silenced = [p for i in range(1, len(blocks), 2) for name, p in model.transformer_blocks[i].named_parameters()
                if name.startswith(("attn1.to_out.0", "attn2.to_out.0", "ff.net.2"))]
    saved = [p.detach().clone() for p in silenced]
    try:
        with torch.no_grad():
            for p in silenced:
                p.zero_()
        grafted = graftfx.splice(graftfx.select(traced, [Rule("block", "parallel_pairs")]))
        inputs = small_diffusers_inputs(kind, 3)
        with torch.no_grad():
            got, want = grafted(**inputs)[0], model(**inputs)[0]
    finally:
        with torch.no_grad():
            for p, v in zip(silenced, saved):
                p.copy_(v)
    assert len(grafted.structure) == len(blocks) // 2 and got.shape[0] == 3
    assert (got - want).abs().max() < 1e-5 and want.abs().max() > 1e-2


# -- parallel pairs on DiT-S/2 --------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit_s2_parallel():
    torch.manual_seed(0)
    model = _activate(DiT_models["DiT-S/2"](input_size=16))    # DiT-S/2 (12 blocks, width 384, 6 heads) on 8x8 patches
    return model, graftfx.graft(model, [Rule("block", "parallel_pairs")], _inputs(model, 2, 0))


def test_parallel_pairs_compute_the_documented_function_on_dit_s2(dit_s2_parallel):
    model, grafted = dit_s2_parallel
    grafted.graph.lint()
    assert [e.blocks for e in grafted.structure] == [(f"blocks.{i}", f"blocks.{i + 1}") for i in range(0, 12, 2)]
    pairs = [(model.blocks[i], model.blocks[i + 1]) for i in range(0, 12, 2)]

    def body(h, c):
        for b1, b2 in pairs:
            h = parallel_block(b1, b2, h, c)
        return h

    with torch.no_grad():
        for batch in (1, 3):                        # traced at 2: the batch stays dynamic
            x, t, y = _inputs(model, batch, batch)
            want = run_model(model, x, t, y, body)
            got = grafted(x, t, y)
            assert got.shape == want.shape and (got - want).abs().max() < 1e-5
        assert (model(x[:1], t[:1], y[:1]) - want[:1]).abs().max() > 1e-3    # and it is not the sequential model


def test_parallel_pair_is_one_trainable_module_on_the_pair_boundary(dit_s2_parallel):
    model, grafted = dit_s2_parallel
    g = grafted.grafts[0]
    region = g.region
    assert g.structural and region.kind == "block_pair" and g.target == "blocks.0_1" and g.operator == "parallel_pairs"
    teacher = region.input.graph                      # the records point into the teacher's traced graph
    assert region.output.graph is teacher and teacher is not grafted.graph
    assert region.input.name == "add" and [a.name for a in region.input.all_input_nodes] == ["transpose", "pos_embed"]
    assert region.output.meta["graftfx_path"] == "blocks.1" and region.output in region.nodes
    assert list(region.extra_inputs) == ["cond"]
    pair = grafted.get_submodule(g.target)
    assert pair.takes == {"cond"}                      # trainers pass every extra input it takes, by name
    assert [n.target for n in grafted.graph.nodes if n.op == "call_module" and n.target == g.target]  # one node
    x = torch.randn(2, 64, 384)
    c = torch.randn(2, 384)
    with torch.no_grad():
        assert (pair(x, cond=c) - parallel_block(model.blocks[0], model.blocks[1], x, c)).abs().max() < 1e-5
    # its parameters are its own copies of the two blocks' (training it never touches the teacher) ...
    ours = dict(pair.named_parameters())
    assert set(ours) == {f"{i}.{k}" for i in (0, 1) for k, _ in model.blocks[0].named_parameters()}
    assert all(torch.equal(ours[f"1.{k}"], p) and ours[f"1.{k}"].data_ptr() != p.data_ptr()
               for k, p in model.blocks[1].named_parameters())
    # ... and they are exactly what stage 1 trains: every block parameter, each once
    spliced = list(grafted.spliced_parameters())
    assert len({id(p) for p in spliced}) == len(spliced)
    assert sum(p.numel() for p in spliced) == sum(p.numel() for p in model.blocks.parameters())


# -- a structural rule with an operator rule in one file, export and load -------------------------

COMBINED = """version = 1
description = "parallel pairs, Hyena-X on the attention of every pair's second block"

[[rule]]
name = "attn-hyena_x"
pattern = "self_attention"
operator = "hyena_x"
select = { every_other = true }

[[rule]]
name = "pairs"
pattern = "block"
operator = "parallel_pairs"
select = { }
"""


def test_structural_and_operator_rules_in_one_file_export_and_load(small, tmp_path):
    path = tmp_path / "combined.toml"
    path.write_text(COMBINED)
    rules = load_rules(path)
    assert [r.structural for r in rules] == [False, True]
    grafted = graftfx.graft(small, path, small.example_inputs(2))
    assert [g.target for g in grafted.grafts] == ["blocks.0_1", "blocks.2_3"]
    edits = grafted.structure
    assert [[r.region.path for r in e.inner] for e in edits] == [["blocks.1.attn"], ["blocks.3.attn"]]
    hyena = [grafted.get_submodule(e.inner[0].target) for e in edits]
    assert edits[0].inner[0].target == "blocks.0_1.1.attn" and all(h.operator_name == "hyena_x" for h in hyena)

    def body(h, c):
        h = parallel_block(small.blocks[0], small.blocks[1], h, c, attn2=hyena[0])
        return parallel_block(small.blocks[2], small.blocks[3], h, c, attn2=hyena[1])

    x, t, y = _inputs(small, 3, 5)
    with torch.no_grad():
        want = run_model(small, x, t, y, body)
        got = grafted(x, t, y)
    assert (got - want).abs().max() < 1e-5
    # the Hyena-X parameters are trained once, as part of their pair
    ids = [id(p) for p in grafted.spliced_parameters()]
    assert len(ids) == len(set(ids)) and {id(p) for p in hyena[0].parameters()} <= set(ids)

    folder = graftfx.export_grafted(grafted, tmp_path / "out")
    manifest = json.loads((folder / "graft.json").read_text())
    assert manifest["format"] == 3
    assert [e["blocks"] for e in manifest["structure"]] == [["blocks.0", "blocks.1"], ["blocks.2", "blocks.3"]]
    assert [(r["path"], r["inside"]) for r in manifest["regions"]] == [("blocks.1.attn", "blocks.0+1"),
                                                                        ("blocks.3.attn", "blocks.2+3")]
    with torch.no_grad():                            # a trained-looking state, so loading has something to do
        for p in grafted.spliced_parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = graftfx.export_grafted(grafted, tmp_path / "out")
    loaded = graftfx.load_grafted(small, folder)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), grafted(x, t, y))
        assert not torch.equal(loaded(x, t, y), want)


# -- dropping and merging -------------------------------------------------------------------------

def test_drop_every_other_block_runs_the_kept_blocks(small, tmp_path):
    grafted = graftfx.graft(small, [Rule("block", "drop_blocks", select={"every_other": True})], small.example_inputs(2))
    grafted.graph.lint()
    assert [(e.form, e.blocks) for e in grafted.structure] == [("drop", ("blocks.1",)), ("drop", ("blocks.3",))]
    assert grafted.grafts == [] and list(grafted.spliced_parameters()) == []     # nothing for stage 1
    assert not any(n.startswith(("blocks.1.", "blocks.3.")) for n, _ in grafted.named_parameters())
    x, t, y = _inputs(small, 3, 7)
    with torch.no_grad():
        want = run_model(small, x, t, y, lambda h, c: small.blocks[2](small.blocks[0](h, c), c))
        assert (grafted(x, t, y) - want).abs().max() < 1e-6
    folder = graftfx.export_grafted(grafted, tmp_path / "dropped")      # no region at all: structure only
    manifest = json.loads((folder / "graft.json").read_text())
    assert manifest["regions"] == [] and [e["blocks"] for e in manifest["structure"]] == [["blocks.1"], ["blocks.3"]]
    loaded = graftfx.load_grafted(small, folder)
    assert not any(n.startswith(("blocks.1.", "blocks.3.")) for n, _ in loaded.named_parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), grafted(x, t, y))


def test_merge_blocks_is_one_block_with_the_mean_weights(small):
    grafted = graftfx.graft(small, [Rule("block", "merge_blocks", select={"range": [2, 4]})], small.example_inputs(2))
    (g,) = grafted.grafts
    assert g.region.kind == "merged_block" and g.region.path == "blocks.2+3" and g.config == {"weights": "mean"}
    merged = copy.deepcopy(small.blocks[2])
    with torch.no_grad():
        for (_, p), (_, q) in zip(merged.named_parameters(), small.blocks[3].named_parameters()):
            p.copy_((p + q) / 2)
    module = grafted.get_submodule(g.target)
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in merged.state_dict().items()}
    assert all(torch.equal(module.state_dict()[k], v) for k, v in merged.state_dict().items())
    x, t, y = _inputs(small, 2, 8)
    with torch.no_grad():
        want = run_model(small, x, t, y, lambda h, c: merged(small.blocks[1](small.blocks[0](h, c), c), c))
        assert (grafted(x, t, y) - want).abs().max() < 1e-5


@pytest.mark.parametrize("operator", ["parallel_pairs", "merge_blocks"])
def test_new_blocks_train_even_when_the_teacher_is_frozen(small, operator):
    """Stage 2 and evaluation freeze the teacher; the new blocks own copies, which must train."""
    frozen = copy.deepcopy(small).requires_grad_(False)
    grafted = graftfx.graft(frozen, [Rule("block", operator, select={"range": [0, 2]})], frozen.example_inputs(2))
    params = list(grafted.spliced_parameters())
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in frozen.parameters())


# -- errors and inspect ---------------------------------------------------------------------------

@pytest.mark.parametrize("rules,words", [
    ([Rule("block", "parallel_pairs", select={"indices": [1]})], ["blocks.1", "no pair", "select consecutive pairs"]),
    ([Rule("block", "merge_blocks"), Rule("self_attention", "hyena_x", select={"indices": [1]})],
     ["blocks.1.attn", "merges", "use parallel_pairs"]),
])
def test_structural_mistakes_are_one_line_errors(small, rules, words):
    with pytest.raises(GraftError) as e:
        graftfx.graft(small, rules, small.example_inputs(2))
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_structural_rules_validate_pattern_and_options():
    with pytest.raises(GraftError, match="rewrites whole blocks: use pattern = 'block'"):
        load_rules([Rule("self_attention", "parallel_pairs")])
    with pytest.raises(GraftError, match="takes a structural operator"):
        load_rules([Rule("block", "hyena_x")])
    with pytest.raises(GraftError, match="weights must be one of mean, first"):
        load_rules([Rule("block", "merge_blocks", options={"weights": "max"})])


def test_inspect_shows_depth_pairs_and_dropped_blocks(small, tmp_path):
    rules = [Rule("block", "parallel_pairs", select={"range": [0, 2]}), Rule("block", "drop_blocks", select={"indices": [3]})]
    report = graftfx.inspect(small, rules, small.example_inputs(2))
    text = report.text()
    assert "depth 4 -> 2: parallel pairs blocks.0+1; dropped blocks.3" in text
    rows = {r.path: r for r in report.rows if r.kind == "block"}
    assert rows["blocks.0"].operator == "parallel_pairs -> blocks.0+1" and rows["blocks.3"].operator == "dropped"
    assert not rows["blocks.2"].selected
    assert report.totals["params_after"] == report.totals["params_before"] - rows["blocks.3"].params
    assert "blocks_0_1" in report.diff and "(after: parallel block blocks.0_1)" in report.svg_after
    files = report.write(tmp_path / "report")
    assert json.loads(files["regions.json"].read_text())["structure"][0]["path"] == "blocks.0+1"


def test_bundled_digits_rule_files():
    from graftfx.models import load_bundled_digits_dit

    model = load_bundled_digits_dit()
    traced = graftfx.trace(model, model.example_inputs(2))
    forms = {}
    for name in ("digits-parallel-pairs.toml", "digits-drop-every-other.toml", "digits-parallel-pairs-hyena_x.toml"):
        report = graftfx.inspect(traced, name, render=False)
        assert report.totals["depth_before"] == 8 and report.totals["depth_after"] == 4
        forms[name] = [(e["form"], e["path"], e.get("inner", [])) for e in report.structure]
    assert forms["digits-parallel-pairs.toml"] == [("parallel", f"blocks.{i}+{i + 1}", []) for i in range(0, 8, 2)]
    assert forms["digits-drop-every-other.toml"] == [("drop", f"blocks.{i}", []) for i in range(1, 8, 2)]
    assert forms["digits-parallel-pairs-hyena_x.toml"] == [("parallel", f"blocks.{i}+{i + 1}", [f"blocks.{i + 1}.attn"])
                                                           for i in range(0, 8, 2)]
