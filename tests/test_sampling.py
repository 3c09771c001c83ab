"""Flow-matching schedule, samplers on analytic velocity fields, and classifier-free guidance.

Convention: x_t = (1 - t) x0 + t noise, the model predicts v = E[noise - x0 | x_t]. For data
x0 ~ N(mu, diag(s^2)) everything is Gaussian, so with var_t = (1 - t)^2 s^2 + t^2 and
r = x - (1 - t) mu:

    E[noise | x_t = x] = t r / var_t,     E[x0 | x_t = x] = mu + (1 - t) s^2 r / var_t,

and the probability-flow ODE maps noise z at t = 1 to mu + s z at t = 0 (an affine map between
Gaussians). For a point mass (s = 0) the field is v = (x - mu) / t: straight lines, which Euler
integrates exactly.
"""

from __future__ import annotations

import pytest
import torch

from bonsai.sampling import SAMPLERS, cfg_velocity, flow_timesteps

D = 64  # data dimensions


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_velocity(mu: torch.Tensor, s: torch.Tensor):
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype)[:, None]
        var = (1 - t) ** 2 * s**2 + t**2
        r = x - (1 - t) * mu
        return t * r / var - (mu + (1 - t) * s**2 * r / var)

    return model


@pytest.fixture(scope="module")
def gaussian():
    """(model, noise, exact x0): data N(mu, diag(s^2)) in float64."""
    g = _gen(0)
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    s = torch.rand(D, generator=g, dtype=torch.float64) * 1.5 + 0.3
    noise = torch.randn(16, D, generator=g, dtype=torch.float64)
    return gaussian_velocity(mu, s), noise, mu + s * noise


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_flow_timesteps_endpoints_and_monotone() -> None:
    for steps in (1, 2, 7, 50):
        t = flow_timesteps(steps)
        assert t.shape == (steps + 1,) and t.dtype == torch.float32
        assert t[0] == 1.0 and t[-1] == 0.0
        assert (t[1:] < t[:-1]).all()
    torch.testing.assert_close(flow_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), rtol=0, atol=0)


@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_flow_timesteps_shift(shift: float) -> None:
    plain, shifted = flow_timesteps(10).double(), flow_timesteps(10, shift).double()
    torch.testing.assert_close(shifted, shift * plain / (1 + (shift - 1) * plain), rtol=1e-6, atol=1e-7)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    inner = slice(1, -1)
    # shift > 1 spends more of the steps at high noise; shift < 1 the opposite
    assert ((shifted[inner] > plain[inner]) if shift > 1 else (shifted[inner] < plain[inner])).all()


@pytest.mark.parametrize("steps", [0, -3])
def test_flow_timesteps_rejects_non_positive_steps(steps: int) -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        flow_timesteps(steps)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 3])
def test_point_mass_is_reached_exactly(name: str, steps: int) -> None:
    target = torch.randn(D, generator=_gen(1), dtype=torch.float64)
    noise = torch.randn(4, D, generator=_gen(2), dtype=torch.float64)
    denoised = []
    out = SAMPLERS[name](
        lambda x, t: (x - target) / t.to(x.dtype)[:, None],
        noise,
        flow_timesteps(steps),
        lambda i, x, x0: denoised.append((i, x0)),
    )
    torch.testing.assert_close(out, target.expand_as(out), rtol=0, atol=1e-6)
    # the callback sees each step once, with the model's clean estimate (here exactly the target)
    assert [i for i, _ in denoised] == list(range(steps))
    for _, x0 in denoised:
        torch.testing.assert_close(x0, target.expand_as(x0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SAMPLERS)
def test_gaussian_converges_to_the_exact_map(gaussian, name: str) -> None:
    model, noise, exact = gaussian
    tolerance = {"euler": 5e-3, "heun": 2e-5, "dpmpp_2m": 2e-4}[name]
    assert rel_err(SAMPLERS[name](model, noise.clone(), flow_timesteps(256)), exact) < tolerance


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_second_order_samplers_beat_euler_at_few_steps(gaussian, name: str) -> None:
    model, noise, exact = gaussian
    for steps in (4, 8, 16):
        timesteps = flow_timesteps(steps)
        err_euler = rel_err(SAMPLERS["euler"](model, noise.clone(), timesteps), exact)
        err = rel_err(SAMPLERS[name](model, noise.clone(), timesteps), exact)
        assert err < 0.75 * err_euler, steps


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order(gaussian, name: str, order: int) -> None:
    """Doubling the steps divides the error by about 2^order (DPM-Solver++ 2M measures ~1.6 at these step
    counts)."""
    model, noise, exact = gaussian
    errors = [rel_err(SAMPLERS[name](model, noise.clone(), flow_timesteps(n)), exact) for n in (32, 64)]
    observed = torch.log2(torch.tensor(errors[0] / errors[1])).item()
    assert order - 0.5 < observed < order + 0.5, observed


class FakeDenoiser:
    """v = x * mean(text over the mask) + t: depends on every input; records each call's batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, text, mask):
        self.batches.append(x.shape[0])
        m = mask[..., None].to(text.dtype)
        pooled = (text * m).sum((1, 2)) / m.sum((1, 2))
        return x * pooled[:, None, None, None] + t[:, None, None, None]


def _conditions(batch: int, seed: int):
    g = _gen(seed)
    text = torch.randn(batch, 5, 8, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[:, 3:] = False
    return text, mask


def test_cfg_scale_one_skips_the_unconditional_pass() -> None:
    denoiser, cond, uncond = FakeDenoiser(), _conditions(2, 3), _conditions(2, 4)
    x, t = torch.randn(2, 3, 4, 4, generator=_gen(5)), torch.rand(2, generator=_gen(6))
    v = cfg_velocity(denoiser, cond, uncond, 1.0)(x, t)
    assert denoiser.batches == [2]
    torch.testing.assert_close(v, FakeDenoiser()(x, t, *cond), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.0])
def test_cfg_combines_both_predictions_in_one_batched_call(scale: float) -> None:
    denoiser, cond, uncond = FakeDenoiser(), _conditions(3, 7), _conditions(3, 8)
    x, t = torch.randn(3, 3, 4, 4, generator=_gen(9)), torch.rand(3, generator=_gen(10))
    v = cfg_velocity(denoiser, cond, uncond, scale)(x, t)
    assert denoiser.batches == [6]  # cond and uncond together, once
    v_c, v_u = FakeDenoiser()(x, t, *cond), FakeDenoiser()(x, t, *uncond)
    torch.testing.assert_close(v, v_u + scale * (v_c - v_u), rtol=1e-6, atol=1e-6)
