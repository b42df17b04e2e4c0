import pytest
import torch

from graftfx import GraftError
from graftfx.models import DiT, DiTConfig, DiT_models, load_dit
from graftfx.models.load import infer_config

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10)

# Key layout of the public DiT checkpoints (DESIGN.md).
PUBLIC_KEYS = ["x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
               "y_embedder.embedding_table.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
               "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
               "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"]


def test_presets_and_param_counts():
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)}
    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"]()
    assert abs(sum(p.numel() for p in xl.parameters()) / 1e6 - 675) < 1  # DiT-XL/2: 675M
    assert xl.x_embedder.num_patches == 256 and len(xl.blocks) == 28


def test_forward_shapes_and_learned_sigma():
    m = DiT(TINY).eval()
    x, t, y = m.example_inputs(3)
    assert m(x, t, y).shape == (3, 8, 8, 8)  # (N, 2C, H, W)
    assert set(PUBLIC_KEYS) <= set(m.state_dict())


def test_cfg_scale_one_is_conditional():
    m = DiT(TINY).eval()
    for b in m.blocks:
        torch.nn.init.normal_(b.adaLN_modulation[1].weight, std=0.05)
    torch.nn.init.normal_(m.final_layer.linear.weight, std=0.05)
    x, t, y = m.example_inputs(2)
    null = torch.full_like(y, 10)
    out = m.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 1.0)
    torch.testing.assert_close(out[:2], m(x, t, y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["pt-bare", "pt-ema", "pt-model", "safetensors"])
def test_load_random_checkpoint_in_public_layout(tmp_path, fmt):
    src = DiT(TINY)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "ckpt.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "ckpt.pt"
        torch.save({"pt-bare": sd, "pt-ema": {"ema": sd, "opt": {}}, "pt-model": {"model": sd}}[fmt], path)
    loaded = load_dit(path)
    assert loaded.config == infer_config(sd)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_wrong_checkpoint_names_missing_unexpected_and_misshaped(tmp_path):
    sd = DiT(TINY).state_dict()
    sd.pop("blocks.1.attn.qkv.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    sd["blocks.2.mlp.fc1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(GraftError) as e:
        load_dit(path, config=TINY)
    msg = str(e.value)
    assert "missing keys: blocks.1.attn.qkv.bias" in msg
    assert "unexpected keys: blocks.0.extra.weight" in msg
    assert "mis-shaped keys: blocks.2.mlp.fc1.weight (3, 3)" in msg
    assert "\n" not in msg


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": DiT(TINY).state_dict(), "hook": print}, path)
    with pytest.raises(GraftError, match="weights_only=True"):
        load_dit(path)
