"""DDPM-trained diffusers denoisers (SD UNets, PixArt) receive flow-matching inputs mapped to the
point of their own schedule with the same signal-to-noise ratio."""

from __future__ import annotations

import pytest
import torch
from diffusers_tiny import tiny_model, tiny_sd15_pipeline

diffusers = pytest.importorskip("diffusers")

from bonsai.train.denoisers import DiffusersDenoiser, scheduler_alphas_cumprod, sd_alphas_cumprod  # noqa: E402


@pytest.fixture(scope="module")
def unet():
    return tiny_model("sd15")


def test_flow_input_maps_to_the_ddpm_point_of_equal_snr(unet):
    den = DiffusersDenoiser(unet)
    ab = sd_alphas_cumprod()
    steps = torch.tensor([3, 250, 500, 777, 990])
    a = ab[steps]
    t = 1 / (1 + (a / (1 - a)).sqrt())  # ((1 - t) / t)^2 = SNR of those training timesteps
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64)
    w = t.view(-1, 1, 1, 1)
    x, timestep = den.vp_input((1 - w) * x0 + w * noise, t.float())
    assert torch.allclose(timestep.double(), steps.double(), atol=0.02), timestep
    expected = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    assert (x - expected).norm() / expected.norm() < 1e-5


def test_unet_teacher_is_called_on_the_mapped_input(unet):
    den = DiffusersDenoiser(unet)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([0.3, 0.8])
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        out = den(x, t, text, mask)
        mapped, timestep = den.vp_input(x, t)
        assert torch.allclose(out, unet(mapped, timestep, encoder_hidden_states=text).sample)
        assert not torch.allclose(out, unet(x, t * 1000, encoder_hidden_states=text).sample, atol=1e-3)


def test_schedule_comes_from_the_pipeline_folder(tmp_path, unet):
    tiny_sd15_pipeline(tmp_path / "sd", unet)
    ab = scheduler_alphas_cumprod(tmp_path / "sd")
    assert torch.allclose(ab, diffusers.DDIMScheduler().alphas_cumprod.double())
    assert not torch.allclose(ab, sd_alphas_cumprod())  # the folder's linear betas, not the default
    diffusers.FlowMatchEulerDiscreteScheduler().save_config(str(tmp_path / "flow" / "scheduler"))
    assert scheduler_alphas_cumprod(tmp_path / "flow") is None
    assert scheduler_alphas_cumprod(tmp_path / "none") is None
