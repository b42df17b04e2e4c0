"""Model adapters and noise schedules: the forward process and regression targets against
diffusers' own schedulers (the schedules a pipeline folder's scheduler_config.json describes)."""
from __future__ import annotations

import json

import pytest
import torch

from graftfx.errors import GraftError
from graftfx.models.adapters import NoiseSchedule, adapter_for
from graftfx.models.diffusion import GaussianDiffusion


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_schedules_match_diffusers(beta_schedule, prediction):
    from diffusers import DDPMScheduler

    config = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
              "beta_schedule": beta_schedule, "prediction_type": prediction}
    ours = NoiseSchedule.from_config(config)
    theirs = DDPMScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, t, noise), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    want = noise if prediction == "epsilon" else theirs.get_velocity(x0, noise, t)
    torch.testing.assert_close(ours.target(x0, t, noise), want, rtol=1e-5, atol=1e-5)


def test_dit_linear_schedule_is_graftfx_gaussian_diffusion_bit_for_bit():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 250, 998])
    assert torch.equal(NoiseSchedule().add_noise(x0, t, noise), GaussianDiffusion(1000).q_sample(x0, t, noise))


def test_flow_matching_from_a_pipeline_folder(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    s = NoiseSchedule.from_folder(tmp_path)
    assert s.prediction == "flow" and s.shift == 3.0
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([250.0, 750.0])                    # s = t / T
    s_ = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(s.add_noise(x0, t, noise), (1 - s_) * x0 + s_ * noise)
    torch.testing.assert_close(s.target(x0, t, noise), noise - x0)
    drawn = s.draw(torch.Generator().manual_seed(0), 4000) / 1000
    assert 0 < drawn.min() and drawn.max() < 1 and drawn.mean() > 0.6   # shift 3 leans to the noisy end


def test_schedule_errors_are_one_line(tmp_path):
    with pytest.raises(GraftError, match="no scheduler_config.json"):
        NoiseSchedule.from_folder(tmp_path)
    with pytest.raises(GraftError, match="beta schedule 'sigmoid'"):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})


def test_adapters_call_models_as_their_pipelines_do():
    from graftfx.models.zoo import small_diffusers

    pixart = small_diffusers("pixart")
    ad = adapter_for(pixart)
    args, kw = ad.example(pixart, 3, text_length=5)
    assert args == () and kw["encoder_hidden_states"].shape == (3, 5, 24) and kw["encoder_attention_mask"].dtype == torch.long
    assert kw["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None} and kw["return_dict"] is False
    with torch.no_grad():
        out = ad.prediction(pixart, pixart(**kw), 4)
    assert out.shape == (3, 4, 8, 8)                    # the eps half of a learned-sigma output
    dit = small_diffusers("dit")
    ad = adapter_for(dit)
    drop = ad.null_conditioning({"labels": torch.tensor([1, 2, 3])}, torch.tensor([False, True, False]), dit)
    assert drop["labels"].tolist() == [1, dit.config.num_embeds_ada_norm, 3]
    with pytest.raises(GraftError, match="no model adapter for Linear"):
        adapter_for(torch.nn.Linear(2, 2))


def test_pixart_drops_captions_to_the_empty_caption_it_is_given():
    from graftfx.models.zoo import small_diffusers

    pixart = small_diffusers("pixart")
    ad = adapter_for(pixart)
    g = torch.Generator().manual_seed(0)
    cond = {"embeddings": torch.randn(3, 5, 24, generator=g), "mask": torch.tensor([[1, 1, 1, 0, 0]] * 3)}
    null = {"embeddings": torch.randn(5, 24, generator=g), "mask": torch.tensor([1, 0, 0, 0, 0])}
    drop = torch.tensor([False, True, False])
    assert ad.null_conditioning(cond, drop, pixart) is cond and not ad.has_null(None)   # none given: kept
    got = ad.null_conditioning(cond, drop, pixart, null)
    assert ad.has_null(null)
    assert torch.equal(got["embeddings"][1], null["embeddings"]) and torch.equal(got["mask"][1], null["mask"])
    for i in (0, 2):
        assert torch.equal(got["embeddings"][i], cond["embeddings"][i]) and torch.equal(got["mask"][i], cond["mask"][i])
