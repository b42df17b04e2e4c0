"""The client zoo (tiny random configs of timm, transformers and diffusers models): what graftfx
matches in each, and the issue's three invariants on every one of them.

1. No false friends: attention over concatenated streams is joint, cross-attention cross,
   causal or padding-masked attention never unmasked self-attention.
2. No silent misses: every attention core of the graph (found here independently of the
   patterns) is a region or a near miss naming the failed condition; every region has a path.
3. Self-graft identity: ``mha`` (copy) on every attention region and ``mlp`` on every MLP region,
   one rule set, reproduce the original (fp32, < 1e-5) at two batch sizes.

Plus a ``hyena_x`` and a ``swa`` graft wherever the kinds allow (runs, finite, the original's
output shape). Traces are shared across tests (``zoo.traced``: once per process).
"""
import pytest
import torch

import graftfx
from graftfx import GraftError, Rule, Select
from graftfx.rewrites.patterns.attention import analyse

from .zoo import CLIENTS, attention_cores, max_diff, regions_by_kind, self_graft_rules, traced

EXPECTED = {   # regions by kind: what a user of each library should find
    "timm:vit": {"self_attention": 2, "mlp": 2},
    "timm:vit-export": {"self_attention": 2, "mlp": 2},
    "timm:swin": {"self_attention": 2, "mlp": 2},
    "transformers:vit": {"self_attention": 2, "mlp": 2},
    "transformers:clip": {"self_attention": 2, "mlp": 2},
    "transformers:bert": {"self_attention": 2, "mlp": 2},
    "transformers:bert-padded": {"self_attention": 2, "mlp": 2},
    "transformers:llama": {"causal_self_attention": 2, "mlp": 2},
    "diffusers:pixart": {"self_attention": 4, "cross_attention": 4, "mlp": 5},
    "diffusers:dit": {"self_attention": 4, "mlp": 4},
    "diffusers:unet": {"self_attention": 3, "cross_attention": 3, "mlp": 3},
    "diffusers:hunyuan": {"self_attention": 4, "cross_attention": 4, "mlp": 4},
    "diffusers:sd3": {"joint_attention": 2, "mlp": 3},
    "diffusers:flux": {"joint_attention": 4, "mlp": 4},
    "diffusers:stable_audio": {"joint_attention": 2, "cross_attention": 2, "mlp": 4},   # + the two conditioning MLPs
}
NAMES = [pytest.param(n, id=n) for n in EXPECTED]


def _available(name):
    if not CLIENTS[name].available():
        pytest.skip(f"{CLIENTS[name].library} is not installed")


@pytest.mark.parametrize("name", NAMES)
def test_regions_by_kind_and_no_silent_misses(name):
    _available(name)
    client, _, tg = traced(name)
    assert client.tracer == "auto" or tg.tracer == client.tracer
    assert regions_by_kind(tg) == EXPECTED[name]
    regions, misses = analyse(tg)
    every = regions + graftfx.match(tg, "mlp").regions
    assert all(r.path for r in every), [r for r in every if not r.path]
    accounted = {r.details["core"] for r in regions} | {c.anchor for c in misses}
    cores = attention_cores(tg.gm)
    assert cores, "the zoo model has attention"
    missing = [n.name for n in cores if n.name not in accounted]
    assert not missing, f"attention cores neither matched nor explained: {missing}"
    assert all(c.reason for c in misses)


def test_hunyuan_pooler_is_a_named_near_miss():
    _available("diffusers:hunyuan")
    _, _, tg = traced("diffusers:hunyuan")
    misses = analyse(tg)[1]
    assert [c.path for c in misses] == ["time_extra_emb.pooler"]
    assert misses[0].reason.startswith("attention core found, but")


# ------------------------------------------------------------------------ no false friends

@pytest.mark.parametrize("name", ["diffusers:sd3", "diffusers:flux"])
def test_joint_streams_are_never_self_attention(name):
    _available(name)
    _, _, tg = traced(name)
    regions = analyse(tg)[0]
    assert {r.kind for r in regions} == {"joint_attention"}
    two = [r for r in regions if r.details["joint_streams"] == 2]
    assert two and all(r.context is not None for r in two)
    # both streams' outputs: the image stream's, and the text stream's where the block has one
    with_text_out = [r.path for r in two if "context" in r.extra_outputs]
    want = ["transformer_blocks.0.attn"] if name.endswith("sd3") else ["transformer_blocks.0.attn",
                                                                        "transformer_blocks.1.attn"]
    assert with_text_out == want       # SD3's last block keeps no text output (context_pre_only)
    with pytest.raises(GraftError, match="matched nothing"):
        graftfx.select(tg, [Rule("self_attention", "mha")])


def test_flux_single_blocks_are_joint_over_the_joined_stream():
    _available("diffusers:flux")
    _, _, tg = traced("diffusers:flux")
    single = [r for r in analyse(tg)[0] if r.path.startswith("single_")]
    assert [r.path for r in single] == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    r = single[0]
    # text + image tokens joined before the blocks, then norm + modulation + projections
    assert r.kind == "joint_attention" and r.details["joint_streams"] == 1
    assert r.details["segments"] == [("context", 5), ("x", 16)] and r.details["x_grid"] == (4, 4)
    assert r.details["out_proj"] is False              # the block's proj_out is shared with its MLP
    assert r.features == ("rope",) and r.details["rope"]["style"] == "interleaved"


@pytest.mark.parametrize("name, cross", [("diffusers:pixart", 4), ("diffusers:unet", 3), ("diffusers:hunyuan", 4)])
def test_cross_attention_stays_cross(name, cross):
    _available(name)
    _, _, tg = traced(name)
    regions = graftfx.match(tg, "cross_attention").regions
    assert len(regions) == cross and all(r.path.endswith("attn2") and r.context is not None for r in regions)
    assert not any(r.path.endswith("attn2") for r in graftfx.match(tg, "self_attention").regions)


def test_causal_and_padded_attention_are_never_unmasked():
    _available("transformers:llama")
    _, _, llama = traced("transformers:llama")
    assert graftfx.match(llama, "self_attention").regions == []
    causal = graftfx.match(llama, "causal_self_attention").regions
    assert all(r.details["causal"] and r.features == ("rope",) for r in causal)
    assert causal[0].details["rope"] == {"style": "half", "layout": "BHLD", "k": True}
    k = causal[0].weights["k.weight"]          # grouped-query: one k/v head shared by both q heads
    assert causal[0].heads == 2 and torch.equal(k[:16], k[16:])
    _, _, padded = traced("transformers:bert-padded")
    _, _, plain = traced("transformers:bert")
    assert all(r.features == ("mask",) for r in graftfx.match(padded, "self_attention").regions)
    # transformers' all-True mask for an unpadded encoder is no mask
    assert all(r.features == () for r in graftfx.match(plain, "self_attention").regions)


def test_swin_carries_its_relative_position_bias_and_shift_mask():
    _available("timm:swin")
    _, _, tg = traced("timm:swin")
    first, shifted = graftfx.match(tg, "self_attention").regions
    assert first.features == shifted.features == ("bias",)
    assert first.details["bias_steps"] == [("add", "bias0")]
    assert [k for k, _ in shifted.details["bias_steps"]] == ["add", "view", "add", "view"]
    assert first.grid == (4, 4) and first.tokens == 16          # the window's grid, from the graph


# ------------------------------------------------------------------- self-graft identity

@pytest.mark.parametrize("name", NAMES)
def test_self_graft_every_region_is_the_original(name):
    _available(name)
    client, model, tg = traced(name)
    grafted = graftfx.splice(graftfx.select(tg, self_graft_rules(tg)))
    assert len(grafted.grafts) == sum(EXPECTED[name].values())
    for batch in (1, 3):
        assert max_diff(client, model, grafted, batch) < 1e-5


@pytest.mark.parametrize("name, feature", [("transformers:bert-padded", "mask"), ("timm:swin", "bias"),
                                           ("transformers:llama", "rope"), ("diffusers:hunyuan", "rope")])
def test_identity_needs_what_the_region_carries(name, feature, monkeypatch):
    """The identity above is not vacuous: when the splicer does not hand the operator the
    padding mask, the bias terms or the rotary tables, the same copy is far from the original."""
    _available(name)
    import importlib

    from graftfx.match.region import feature_of

    splice_module = importlib.import_module("graftfx.splice.splice")   # the module, not the function

    client, model, tg = traced(name)
    passed = splice_module.passed_inputs
    monkeypatch.setattr(splice_module, "passed_inputs", lambda region, op: {
        k: v for k, v in passed(region, op).items() if feature_of(k) != feature})
    grafted = graftfx.splice(graftfx.select(tg, self_graft_rules(tg)))
    assert max_diff(client, model, grafted, 2) > 1e-3


# ------------------------------------------------------------------ hyena_x and swa grafts

def _shape_check(client, model, grafted):
    args, kwargs = client.inputs(2)
    with torch.no_grad():
        out, ref = client.output(grafted(*args, **kwargs)), client.output(model(*args, **kwargs))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return out, ref


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("operator", ["hyena_x", "swa"])
def test_hyena_x_and_swa_graft_where_the_kinds_allow(name, operator):
    _available(name)
    client, model, tg = traced(name)
    spec = graftfx.registry.get_operator(operator)
    kinds = [k for k in ("self_attention", "causal_self_attention") if k in spec.kinds and graftfx.match(tg, k).regions]
    if not kinds:
        pytest.skip(f"{name} has no region {operator} replaces")
    rules = [Rule(k, operator, Select(paths=["*"]), name=k) for k in kinds]
    if name == "transformers:bert-padded":
        with pytest.raises(GraftError, match=f"cannot replace encoder.layer.0.attention: it carries a key-padding "
                                             f"mask, which {operator} does not take .*mha"):
            graftfx.select(tg, rules)
        return
    grafted = graftfx.splice(graftfx.select(tg, rules))
    assert {g.operator for g in grafted.grafts} == {operator}
    out, ref = _shape_check(client, model, grafted)
    assert (out - ref).abs().max() > 1e-4          # a real replacement, not the original


@pytest.mark.parametrize("name", ["diffusers:sd3", "diffusers:flux"])
def test_joint_nat2d_grafts_mmdit(name):
    _available(name)
    client, model, tg = traced(name)
    covering = graftfx.splice(graftfx.select(tg, [Rule("joint_attention", "joint_nat2d", Select(paths=["*"]),
                                                       {"kernel_size": 7})]))
    for batch in (1, 3):                  # a 7x7 window covers the 4x4 grid: the original attention
        assert max_diff(client, model, covering, batch) < 1e-5
    local = graftfx.splice(graftfx.select(tg, [Rule("joint_attention", "joint_nat2d", Select(paths=["*"]),
                                                    {"kernel_size": 3})]))
    out, ref = _shape_check(client, model, local)
    assert (out - ref).abs().max() > 1e-3


def test_explain_names_every_unmatched_core():
    _available("diffusers:hunyuan")
    _, _, tg = traced("diffusers:hunyuan")
    text = "\n".join(str(e) for e in graftfx.explain(tg, [Rule("self_attention", "hyena_x")]))
    assert "attention cores not matched (1):" in text
    assert "time_extra_emb.pooler: attention core found, but" in text
    assert "note: hyena_x does not apply the rotary embedding of blocks.0.attn1" in text
    _, _, padded = traced("transformers:bert-padded")
    text = "\n".join(str(e) for e in graftfx.explain(padded, [Rule("self_attention", "swa")]))
    assert "refused: operator 'swa' cannot replace encoder.layer.0.attention: it carries a key-padding mask" in text
