"""Flow-matching samplers as small pure functions (in the style of k-diffusion).

Convention (rectified flow): x_t = (1 - t) x0 + t noise, t in [0, 1]; the model predicts the
velocity v = noise - x0, so dx/dt = v and the clean estimate is x0 = x_t - t v. Sampling
integrates from t = 1 (pure noise) to t = 0.

Every sampler has the signature sample(model, x, timesteps, callback) -> x0, where
model(x, t) -> v takes t as a [B] tensor and `timesteps` is a decreasing 1-D tensor ending at 0.
"""

from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, x, denoised)


def seeded_noise(shape: tuple[int, ...], seeds: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Starting noise float32 [len(seeds), *shape] on the CPU, one generator per seed, so an image's
    noise depends on its seed alone (not on the batch or the device)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def flow_timesteps(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """steps + 1 times from 1 to 0. shift > 1 spends more steps at high noise (SD3's time shift)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t.float()


def img2img_timesteps(steps: int, strength: float, shift: float = 1.0) -> torch.Tensor:
    """The times of the `steps` schedule that img2img at `strength` runs: those <= strength, starting
    from the init image noised to the first. len - 1 steps; fewer than 2 times leave no step."""
    timesteps = flow_timesteps(steps, shift)
    return timesteps[timesteps <= strength]


def _t(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.to(x.device, x.dtype).expand(x.shape[0])


@torch.no_grad()
def sample_euler(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """First-order Euler steps along the velocity field."""
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        v = model(x, _t(x, t))
        if callback is not None:
            callback(i, x, x - t * v)
        x = x + (t_next - t) * v
    return x


@torch.no_grad()
def sample_heun(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """Second-order Heun: an Euler predictor, corrected by the velocity at its end point
    (plain Euler for the last step, where t_next = 0). Two model calls per step."""
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        v = model(x, _t(x, t))
        if callback is not None:
            callback(i, x, x - t * v)
        x_pred = x + (t_next - t) * v
        if t_next > 0:
            v_next = model(x_pred, _t(x, t_next))
            x_pred = x + (t_next - t) * (v + v_next) / 2
        x = x_pred
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): multistep second order in the data prediction x0, one call per step.

    With alpha_t = 1 - t and sigma_t = t, lambda = log(alpha / sigma); the update is
    x' = (sigma'/sigma) x - alpha' (exp(-h) - 1) D, D a second-order blend of the last two x0."""
    def lam(t: torch.Tensor) -> torch.Tensor:
        return torch.log((1 - t) / t)

    old_x0, h_prev = None, None
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i].double(), timesteps[i + 1].double()
        v = model(x, _t(x, timesteps[i]))
        x0 = x - timesteps[i] * v
        if callback is not None:
            callback(i, x, x0)
        if t_next == 0:
            x = x0
            break
        t_cur = t.clamp(max=1 - 1e-6)  # t = 1 has alpha = 0 and lambda = -inf
        h = lam(t_next) - lam(t_cur)
        denoised = x0
        if old_x0 is not None and h_prev is not None:
            r = h_prev / h
            denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        x = (t_next / t_cur).float() * x - ((1 - t_next) * torch.expm1(-h)).float() * denoised
        old_x0, h_prev = x0, h
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}
