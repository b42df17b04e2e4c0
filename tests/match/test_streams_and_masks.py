"""Matching what real models contain, on small hand-written modules: joint streams behind norms,
modulations and projections; masks that are no mask, padding masks, causal masks; additive
biases; token grids from the graph (never from a square token count); token-sequence MLPs only;
CLIP's quick_gelu; the joint neighbourhood attention against its dense masked reference."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graftfx
from graftfx import GraftError, Rule, Select
from graftfx.rewrites.patterns.attention import analyse

from .zoo import InterleavedQKV

D = 32


def _same(model, traced_or_grafted, *inputs):
    with torch.no_grad():
        return float((traced_or_grafted(*inputs) - model(*inputs)).abs().max())


class Modulated(nn.Module):
    """Text and image tokens joined, then norm, adaLN modulation and a projection before q/k/v:
    joint attention, whatever stands between the cat and the attention."""

    def __init__(self, learned_prefix: bool = False):
        super().__init__()
        self.learned_prefix = learned_prefix
        self.ctx_in, self.norm, self.mod = nn.Linear(24, D), nn.LayerNorm(D), nn.Linear(8, 2 * D)
        self.pre = nn.Linear(D, D)
        self.prefix = nn.Parameter(torch.randn(1, 5, D))
        self.attn = InterleavedQKV()

    def forward(self, x, ctx, t):
        first = self.prefix.expand(x.shape[0], -1, -1) if self.learned_prefix else self.ctx_in(ctx)
        h = torch.cat([first, x], dim=1)
        scale, shift = self.mod(t).unsqueeze(1).chunk(2, dim=-1)
        h = self.pre(self.norm(h) * (1 + scale) + shift)
        return self.attn(h)[:, 5:]


def _modulated_inputs(batch):
    return torch.randn(batch, 16, D), torch.randn(batch, 5, 24), torch.randn(batch, 8)


def test_joint_behind_norm_modulation_and_projection():
    model = Modulated().eval()
    traced = graftfx.trace(model, _modulated_inputs(2))
    (r,) = analyse(traced)[0]
    assert r.kind == "joint_attention" and r.details["segments"] == [("context", 5), ("x", 16)]
    assert graftfx.match(traced, "self_attention").regions == []
    grafted = graftfx.splice(graftfx.select(traced, [Rule("joint_attention", "mha")]))
    assert _same(model, grafted, *_modulated_inputs(3)) < 1e-5
    with pytest.raises(GraftError, match="replaces self_attention or causal_self_attention regions, but attn is "
                                         "joint_attention"):
        graftfx.select(traced, [Rule("joint_attention", "hyena_x")])


def test_learned_prefix_tokens_are_not_a_stream():
    # a class/register token (a parameter) joined to the image tokens is still self-attention
    traced = graftfx.trace(Modulated(learned_prefix=True).eval(), _modulated_inputs(2))
    assert [r.kind for r in analyse(traced)[0]] == ["self_attention"]


class MaskedAttention(nn.Module):
    """Explicit softmax with an additive bias (a learned table) and an optional padding mask."""

    def __init__(self, causal=False, padding=False):
        super().__init__()
        self.causal, self.padding = causal, padding
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.bias = nn.Parameter(torch.randn(4, 8, 8))
        self.scale = (D // 4) ** -0.5

    def forward(self, x, keep):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 4, C // 4).permute(2, 0, 3, 1, 4).unbind(0)
        s = (q @ k.transpose(-2, -1)) * self.scale + self.bias
        if self.causal:
            s = s + torch.full((N, N), float("-inf")).triu(1)
        if self.padding:
            s = s + (1.0 - keep[:, None, None, :].float()) * -1e9
        o = s.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Masked(nn.Module):
    def __init__(self, causal=False, padding=False):
        super().__init__()
        self.attn = MaskedAttention(causal, padding)

    def forward(self, x, keep):
        return x + self.attn(x, keep)


def _keep(batch):
    keep = torch.ones(batch, 8)
    keep[-1, -3:] = 0
    return keep


@pytest.mark.parametrize("causal, padding, kind, features", [
    (False, False, "self_attention", ("bias",)),
    (True, False, "causal_self_attention", ("bias",)),
    (False, True, "self_attention", ("mask", "bias")),
])
def test_masks_and_biases_are_carried_and_reproduced(causal, padding, kind, features):
    model = Masked(causal, padding).eval()
    traced = graftfx.trace(model, (torch.randn(2, 8, D), _keep(2)))
    (r,) = analyse(traced)[0]
    assert (r.kind, r.features) == (kind, features)
    grafted = graftfx.splice(graftfx.select(traced, [Rule(kind, "mha")]))
    for batch in (1, 3):
        assert _same(model, grafted, torch.randn(batch, 8, D), _keep(batch)) < 1e-5
    if padding:
        with pytest.raises(GraftError, match="it carries a key-padding mask, which swa does not take"):
            graftfx.select(traced, [Rule(kind, "swa")])
    elif not causal:
        plan = graftfx.select(traced, [Rule(kind, "swa")])          # a bias is optional: dropped, said so
        assert plan.outcomes[0].notes == ["swa does not apply the additive attention bias (e.g. relative-position "
                                          "bias) of attn: it is trained without it"]


class Tokens(nn.Module):
    """A text encoder block over 16 token ids: 16 is a square, but there is no 4x4 image."""

    def __init__(self):
        super().__init__()
        self.embed, self.attn = nn.Embedding(50, D), InterleavedQKV()
        self.patch = nn.Conv2d(3, D, 4, 4)

    def forward(self, ids, image):
        text = self.attn(self.embed(ids))
        patches = self.patch(image).flatten(2).transpose(1, 2)        # (B, 16, D) from a 4x4 map
        return text, self.attn(patches)


def test_grids_come_from_the_model_never_from_a_square_count():
    model = Tokens().eval()
    inputs = (torch.randint(0, 50, (2, 16)), torch.randn(2, 3, 16, 16))
    text, image = graftfx.match(graftfx.trace(model, inputs), "self_attention").regions
    assert (text.tokens, text.grid) == (16, None)
    assert (image.tokens, image.grid) == (16, (4, 4))
    traced = graftfx.trace(model, inputs, grid=(2, 8))                 # the user's grid wins
    assert {r.grid for r in graftfx.match(traced, "self_attention").regions} == {(2, 8)}
    with pytest.raises(GraftError, match="nat2d needs the token grid, and attn has none"):
        graftfx.splice(graftfx.select(graftfx.trace(model, inputs), [Rule("self_attention", "nat2d", Select(paths=["*"]))]))


class Embedded(nn.Module):
    """A timestep MLP over (B, D) vectors, an adaLN chain, a token MLP with CLIP's quick_gelu."""

    def __init__(self):
        super().__init__()
        self.t1, self.t2 = nn.Linear(8, D), nn.Linear(D, D)
        self.ada = nn.Linear(D, 2 * D)
        self.fc1, self.fc2 = nn.Linear(D, 64), nn.Linear(64, D)

    def forward(self, x, t):
        emb = self.t2(F.silu(self.t1(t)))                              # (B, D): not a token MLP
        scale, shift = self.ada(F.silu(emb)).unsqueeze(1).chunk(2, -1)
        h = x * (1 + scale) + shift
        h = self.fc1(h)
        return self.fc2(h * torch.sigmoid(1.702 * h)) + emb.unsqueeze(1)


def test_only_token_sequence_mlps_and_quick_gelu():
    model = Embedded().eval()
    traced = graftfx.trace(model, (torch.randn(2, 16, D), torch.randn(2, 8)))
    report = graftfx.match(traced, "mlp")
    assert [(r.activation, r.tokens, r.path) for r in report.regions] == [("quick_gelu", 16, "fc1")]
    assert any("not a (batch, tokens, width) token sequence" in c.reason for c in report.near_misses)
    grafted = graftfx.splice(graftfx.select(traced, [Rule("mlp", "mlp", Select(paths=["*"]))]))
    assert _same(model, grafted, torch.randn(3, 16, D), torch.randn(3, 8)) < 1e-5


# ------------------------------------------------------------ joint neighbourhood attention

@pytest.mark.parametrize("order", [("context", "x"), ("x", "context")])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_joint_nat2d_equals_its_dense_masked_reference(order, kernel_size):
    from graftfx.registry import get_operator
    from graftfx.rewrites.operators.joint_nat2d import dense_mask

    from ..rewrites._support import region

    spec = get_operator("joint_nat2d")
    reg = region(width=D, tokens=16, heads=4, kind="joint_attention", grid=(4, 4),
                 details={"segments": [(n, 16 if n == "x" else 5) for n in order]})
    op = spec.cls.from_region(reg, spec.make_config({"kernel_size": kernel_size, "init": "fresh"}))
    segments = tuple((n, 16 if n == "x" else 5) for n in order)
    q, k, v = (torch.randn(2, 4, 21, 8, requires_grad=True) for _ in range(3))
    got = op.joint_kernel(q, k, v, segments)
    want = op.reference_attention(q, k, v, segments)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cot = torch.randn_like(got)
    g1 = torch.autograd.grad(got, (q, k, v), cot)
    g2 = torch.autograd.grad(want, (q, k, v), cot)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    mask = dense_mask(segments, (4, 4), kernel_size)
    names = [n for n, c in segments for _ in range(c)]                # the stream of each position
    text = [i for i, n in enumerate(names) if n == "context"]
    assert mask[text].all() and mask[:, text].all()                  # text: global both ways
    image = [i for i in range(21) if i not in text]
    assert (mask[image][:, image].sum(1) == min(kernel_size, 4) ** 2).all()   # image: a k x k window


class SliceRotated(nn.Module):
    """CogVideoX-style: q and k of the image tokens (after a text prefix) rotated in place by slice
    assignment. A walk along the data flow from the core never sees the write. (torch.fx cannot
    trace item assignment; export keeps it as ``copy_`` into a slice.)"""

    def __init__(self, in_place: bool = True):
        super().__init__()
        self.in_place = in_place
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, cos, sin):                              # x (N, 4 + L, D); cos/sin (L, 16)
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, 2, 16).transpose(1, 2) for p in (self.q, self.k, self.v))  # (N, 2, T, 16)

        def rot(u):
            a, b = u.chunk(2, dim=-1)
            return u * cos + torch.cat([-b, a], dim=-1) * sin

        if self.in_place:
            q[:, :, 4:] = rot(q[:, :, 4:])
            k[:, :, 4:] = rot(k[:, :, 4:])
        else:
            q, k = rot(q), rot(k)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(n, t, D))


def test_q_written_in_place_is_a_named_near_miss_never_a_region():
    torch.manual_seed(0)
    x, cos, sin = torch.randn(2, 20, D), torch.randn(16, 16), torch.randn(16, 16)
    tg = graftfx.trace(SliceRotated().eval(), (x, cos, sin))
    assert tg.tracer == "export"
    regions, misses = analyse(tg)
    assert regions == []
    assert len(misses) == 1 and "q is written in place" in misses[0].reason
    # the same rotation applied to every token is carried as RoPE
    tg = graftfx.trace(SliceRotated(in_place=False).eval(), (torch.randn(2, 16, D), cos, sin), tracer="export")
    (region,), _ = analyse(tg)
    assert region.features == ("rope",)


class PartialRotaryGQA(nn.Module):
    """StableAudio-style: k/v with one head repeated for both q heads (repeat_interleave), and a
    rotary embedding on the first 8 of each head's 16 channels, the rest unrotated."""

    def __init__(self):
        super().__init__()
        self.q, self.out = nn.Linear(D, D), nn.Linear(D, D)
        self.k, self.v = nn.Linear(D, 16), nn.Linear(D, 16)

    def forward(self, x, cos, sin):                              # x (N, L, D); cos/sin (L, 8)
        n, t, _ = x.shape
        q = self.q(x).view(n, t, 2, 16).transpose(1, 2)           # (N, 2, L, 16)
        k, v = (p(x).view(n, t, 1, 16).transpose(1, 2) for p in (self.k, self.v))
        k, v = (torch.repeat_interleave(u, 2, dim=1) for u in (k, v))

        def rot(u):
            head, rest = u[..., :8], u[..., 8:]
            a, b = head.chunk(2, dim=-1)
            return torch.cat([head * cos + torch.cat([-b, a], dim=-1) * sin, rest], dim=-1)

        o = F.scaled_dot_product_attention(rot(q), rot(k), v)
        return self.out(o.transpose(1, 2).reshape(n, t, D))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_partial_rotary_and_repeated_kv_heads_are_carried(tracer, monkeypatch):
    torch.manual_seed(0)
    model = PartialRotaryGQA().eval()
    inputs = (torch.randn(2, 16, D), torch.randn(16, 8), torch.randn(16, 8))
    tg = graftfx.trace(model, inputs, tracer=tracer)
    (region,), misses = analyse(tg)
    assert misses == [] and region.features == ("rope",)
    assert region.details["rope"] == {"style": "half", "layout": "BHLD", "k": True, "rot_dim": 8}
    k = region.weights["k.weight"]                     # one k head, expanded for both q heads
    assert k.shape == (D, D) and torch.equal(k[:16], k[16:])
    grafted = graftfx.splice(graftfx.select(tg, [Rule("self_attention", "mha")]))
    assert _same(model, grafted, *inputs) < 1e-5
    # rotating all 16 channels instead of the first 8 is far from the original
    import graftfx.operator as operator_module

    full = operator_module.apply_rope
    monkeypatch.setattr(operator_module, "apply_rope", lambda t, c, s, style, layout, rot_dim=None: full(
        t, torch.cat([c, c], -1), torch.cat([s, s], -1), style, layout))
    grafted = graftfx.splice(graftfx.select(tg, [Rule("self_attention", "mha")]))
    assert _same(model, grafted, *inputs) > 1e-3


class SdpaGQA(nn.Module):
    """SDPA's own grouped-query attention: one k/v head for two q heads (``enable_gqa=True``)."""

    def __init__(self):
        super().__init__()
        self.q, self.out, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 16), nn.Linear(D, 16)

    def forward(self, x):                                        # (N, L, D)
        n, t, _ = x.shape
        q = self.q(x).view(n, t, 2, 16).transpose(1, 2)           # (N, 2, L, 16)
        k, v = (p(x).view(n, t, 1, 16).transpose(1, 2) for p in (self.k, self.v))   # (N, 1, L, 16)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.out(o.transpose(1, 2).reshape(n, t, D))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_sdpa_enable_gqa_is_self_attention_with_the_kv_heads_expanded(tracer):
    torch.manual_seed(0)
    model, x = SdpaGQA().eval(), torch.randn(2, 8, D)
    tg = graftfx.trace(model, (x,), tracer=tracer)
    (region,), misses = analyse(tg)
    assert misses == [] and region.heads == 2
    v = region.weights["v.weight"]
    assert v.shape == (D, D) and torch.equal(v[:16], v[16:]) and torch.equal(v[:16], model.v.weight)
    grafted = graftfx.splice(graftfx.select(tg, [Rule("self_attention", "mha")]))
    for batch in (1, 3):
        inputs = torch.randn(batch, 8, D)
        assert _same(model, grafted, inputs) < 1e-5


class FilledScores(nn.Module):
    """Masks written on the scores: masked_fill with a padding mask, torch.where with a causal
    one (GPT-2 style, finfo.min), and both (causal -inf, then padding -1e9)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, pad=None):                                # x (N, 8, D); pad (N, 8), 0 = padding
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, 2, 16).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) * 0.25                    # (N, 2, 8, 8)
        if self.mode == "padding":
            scores = scores.masked_fill(pad[:, None, None, :] == 0, float("-inf"))
        elif self.mode == "causal":
            scores = torch.where(torch.ones(8, 8, dtype=torch.bool).tril(), scores, torch.finfo(torch.float32).min)
        else:
            scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
            scores = scores.masked_fill(pad[:, None, None, :] == 0, -1e9)
        o = scores.softmax(-1) @ v
        return self.out(o.transpose(1, 2).reshape(n, t, D))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("mode, kind, features", [("padding", "self_attention", ("mask",)),
                                                  ("causal", "causal_self_attention", ()),
                                                  ("both", "causal_self_attention", ("mask",))])
def test_masks_filled_into_the_scores_are_carried(mode, kind, features, tracer, monkeypatch):
    torch.manual_seed(0)
    model = FilledScores(mode).eval()
    pad = torch.ones(2, 8, dtype=torch.long)
    pad[1, -3:] = 0
    inputs = (torch.randn(2, 8, D),) + ((pad,) if mode != "causal" else ())
    tg = graftfx.trace(model, inputs, tracer=tracer)
    (region,), misses = analyse(tg)
    assert misses == [] and region.kind == kind and region.features == features
    grafted = graftfx.splice(graftfx.select(tg, [Rule(kind, "mha")]))
    assert _same(model, grafted, *inputs) < 1e-5
    if features:                       # not vacuous: without the mask the copy is far from the original
        import importlib

        splice_module = importlib.import_module("graftfx.splice.splice")
        monkeypatch.setattr(splice_module, "passed_inputs", lambda region, op: {})
        grafted = graftfx.splice(graftfx.select(tg, [Rule(kind, "mha")]))
        assert _same(model, grafted, *inputs) > 1e-3
        with pytest.raises(GraftError, match="key-padding mask"):
            graftfx.select(tg, [Rule(kind, "hyena_x")])
