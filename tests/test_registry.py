"""graftfx.registry: a broken plug-in module is an error on every lookup, never a smaller registry;
only protocol-following operators register."""
import sys
from dataclasses import dataclass

import pytest
import torch

from graftfx import registry
from graftfx.operator import Operator


@pytest.fixture
def broken_plugins(tmp_path, monkeypatch):
    pkg = tmp_path / "graftfx_test_plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("LOADED = True\n")
    (pkg / "broken.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "PLUGIN_PACKAGES", registry.PLUGIN_PACKAGES + ("graftfx_test_plugins",))
    monkeypatch.setattr(registry, "_loaded", False)
    yield
    for name in [m for m in sys.modules if m.startswith("graftfx_test_plugins")]:
        del sys.modules[name]


def test_a_broken_operator_module_fails_every_lookup(broken_plugins):
    for _ in range(2):  # not once, then a silently smaller registry
        with pytest.raises(ModuleNotFoundError, match="a_module_that_is_not_installed"):
            registry.operators()
        with pytest.raises(ModuleNotFoundError):
            registry.get_operator("mha")
    assert registry._loaded is False


def test_the_registry_is_loaded_once_everything_imported():
    assert "swa" in registry.operators() and registry._loaded is True
    assert {"self_attention", "cross_attention", "mlp"} <= set(registry.patterns())


@dataclass
class _Options:
    pass


def test_only_operators_that_follow_the_protocol_register():
    with pytest.raises(TypeError, match="must subclass graftfx.operator.Operator"):
        registry.register_operator("test_plain_module", config=_Options, kinds=("mlp",))(torch.nn.Identity)

    class NoFlops(Operator):
        @classmethod
        def from_region(cls, region, config):
            return cls()

    with pytest.raises(TypeError, match="needs a method flops"):
        registry.register_operator("test_no_flops", config=_Options, kinds=("mlp",))(NoFlops)
    with pytest.raises(TypeError, match="config must be a dataclass"):
        registry.register_operator("test_no_config", config=dict, kinds=("mlp",))
    assert not {"test_plain_module", "test_no_flops", "test_no_config"} & set(registry.OPERATORS)


def test_unknown_names_suggest_and_list():
    with pytest.raises(registry.GraftError, match=r"rules.toml: rule 1: unknown operator 'hyena_xx' \(did you mean "
                                                  r"'hyena_x'\?\); valid choices: .*swa"):
        registry.get_operator("hyena_xx", "rules.toml: rule 1: ")


def test_a_second_name_is_an_alias_that_leaves_the_class_as_it_was():
    from graftfx.rewrites.operators.mlp import MLP

    registry.load_plugins()
    try:
        registry.register_operator("graftfx.rewrites.operators.mlp:MLP", config=MLP.config_class, kinds=("mlp",))(MLP)
        assert registry.OPERATORS["graftfx.rewrites.operators.mlp:MLP"].cls is MLP
        assert MLP.operator_name == "mlp" and registry.get_operator("mlp").cls is MLP
    finally:
        registry.OPERATORS.pop("graftfx.rewrites.operators.mlp:MLP", None)
