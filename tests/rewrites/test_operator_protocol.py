"""Every registered operator follows the protocol of graftfx.operator.

Built by the engine's ``build_operator`` from a region the built-in pattern matched in a small
model (an attention with q/k norms and a non-default scale, or DiT's MLP): the config is kept
as ``self.config`` (an instance of the spec's config, equal to the rule's), ``flops`` is a
positive int, the output has the region's width at any batch size (each sample independent of
the others), ``reference()`` shares the very parameter tensors and, for operators with a
reference, matches the Triton path in outputs and gradients; the manifest's
``dataclasses.asdict(config)`` (through JSON) rebuilds an equal config.
"""
import dataclasses
import json

import pytest
import torch

from graftfx.models.dit import Mlp
from graftfx.operator import Operator
from graftfx.registry import LOSSES, get_operator, operators
from graftfx.rules import Rule
from graftfx.splice.splice import build_operator

from ._support import SelfAttention, assert_triton_matches_reference, traced_region

WIDTH, TOKENS = 16, 9
NAMES = sorted(operators())
# Small non-default options where the defaults would make the interpreter slow.
OPTIONS = {"mamba2": {"d_state": 4, "headdim": 8, "chunk_size": 16}}


class _Joined(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.text, self.image, self.attn = torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, WIDTH), attn

    def forward(self, x):
        return self.attn(torch.cat([self.text(x[:, :5]), self.image(x[:, 5:])], dim=1))


def _region(kind):
    torch.manual_seed(5)
    x = torch.randn(2, TOKENS, WIDTH)
    if kind == "self_attention":
        module = SelfAttention(WIDTH, 2, norm="layer_norm", over="head", scale=0.5)
    elif kind == "mlp":
        module = Mlp(WIDTH, 4 * WIDTH)
    elif kind == "joint_attention":      # two streams of the input joined, then attention (Flux single-block style)
        module = _Joined(SelfAttention(WIDTH, 2, norm="layer_norm", over="head", scale=0.5))
        return traced_region(module, x, kind=kind, grid=(2, 2))    # the image stream: the last 4 tokens
    else:
        pytest.fail(f"no test region for kind {kind!r}: add one here")
    return traced_region(module, x, kind=kind, grid=(3, 3))    # the user's grid: 9 tokens say nothing themselves


@pytest.fixture(scope="module")
def regions():
    return {kind: _region(kind) for kind in ("self_attention", "mlp", "joint_attention")}


def _built(name, regions):
    spec = get_operator(name)
    rule = Rule(pattern=spec.kinds[0], operator=name, options=dict(OPTIONS.get(name, {})))
    torch.manual_seed(11)
    return spec, rule, build_operator(rule, regions[spec.kinds[0]])


def test_the_paper_operators_are_registered():
    assert {"hyena_se", "hyena_x", "hyena_y", "hyena_x2d", "swa", "nat2d", "linear_attention",
            "mamba2", "mha", "mlp", "mlp_hyena_x"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_spec(name):
    spec = get_operator(name)
    assert issubclass(spec.cls, Operator) and dataclasses.is_dataclass(spec.config)
    assert spec.cls.operator_name == name and spec.cls.config_class is spec.config
    assert spec.kinds and spec.loss in LOSSES and spec.description
    spec.config()                                             # the defaults are a valid config
    for options in spec.cls.bench_options:                    # what the benchmark times is valid
        spec.make_config(dict(options))
    for backend in spec.cls.backends:
        assert set(backend.options) <= set(spec.option_names()), backend
        spec.make_config(dict(backend.options))


@pytest.mark.parametrize("name", NAMES)
def test_build_config_and_flops(name, regions):
    spec, rule, op = _built(name, regions)
    assert type(op) is spec.cls
    assert isinstance(op.config, spec.config) and op.config == rule.config()
    assert op.options() == dataclasses.asdict(op.config)
    flops = op.flops(TOKENS)
    assert type(flops) is int and flops > 0, flops
    if name in ("mha", "mlp"):           # copies of the original: the pattern's count of it
        assert flops == regions[spec.kinds[0]].flops
    assert repr(op)


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_batch_independence(name, regions):
    spec, _, op = _built(name, regions)
    r = regions[spec.kinds[0]]
    x = torch.randn(3, TOKENS, WIDTH)
    with torch.no_grad():
        y3 = op.reference()(x)
        y1 = op.reference()(x[1:2])
    assert y3.shape == (3, TOKENS, r.out_width) and y3.dtype == x.dtype
    torch.testing.assert_close(y1, y3[1:2], rtol=1e-5, atol=1e-6)     # sample 1 alone: the same
    assert (y3[0] - y3[1]).abs().max() > 1e-4                          # and inputs matter


@pytest.mark.parametrize("name", NAMES)
def test_reference_shares_the_parameters(name, regions):
    spec, _, op = _built(name, regions)
    ref = op.reference()
    if not spec.cls.has_reference():
        assert ref is op
        with pytest.raises(TypeError, match="plain PyTorch"):
            op.kernel_reference(torch.zeros(1))
        return
    assert ref is not op and type(ref) is type(op)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in op.named_parameters()]
    assert all(a is b for a, b in zip(ref.parameters(), op.parameters()))
    assert all(a is b for a, b in zip(ref.buffers(), op.buffers()))
    with torch.no_grad():                                             # a change shows in both
        first = next(op.parameters())
        first.add_(1.0)
        assert torch.equal(next(ref.parameters()), first)
    assert op.kernel.__func__ is spec.cls.kernel                      # the operator keeps its kernel


@pytest.mark.parametrize("name", [n for n in NAMES if get_operator(n).cls.has_reference()])
def test_triton_path_matches_the_reference(name, regions):
    _, _, op = _built(name, regions)
    assert_triton_matches_reference(op, torch.randn(2, TOKENS, WIDTH))


@pytest.mark.parametrize("name", NAMES)
def test_manifest_config_round_trips(name, regions):
    spec, _, op = _built(name, regions)
    stored = json.loads(json.dumps(dataclasses.asdict(op.config)))     # what graft.json holds
    assert set(stored) == set(spec.option_names())
    config = spec.make_config(stored)
    assert config == op.config and type(config) is spec.config
    rebuilt = spec.cls.from_region(regions[spec.kinds[0]], config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in op.state_dict().items()}
    for options in spec.cls.bench_options:                             # non-default options too
        config = spec.make_config(dict(options))
        assert spec.make_config(json.loads(json.dumps(dataclasses.asdict(config)))) == config
