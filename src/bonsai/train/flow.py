"""The flow-matching (rectified flow) training objective.

x_t = (1 - t) x0 + t noise; the denoiser learns v = noise - x0. Timesteps are drawn from a
logit-normal distribution (as in SD3), which spends more training on mid-range noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_timesteps(batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """t in (0, 1), logit-normal(0, 1): [B] float32."""
    return torch.sigmoid(torch.randn(batch, device=device, generator=generator))


def noisy_inputs(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) for clean samples x0 [B, ...] at times t [B]."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * noise, noise - x0


def drop_text(
    text: torch.Tensor, mask: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor], p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's text by the empty prompt's encoding with probability p, so the model
    also learns the unconditional velocity that classifier-free guidance needs."""
    if p <= 0:
        return text, mask
    drop = torch.rand(text.shape[0], device=text.device, generator=generator) < p
    e_text, e_mask = empty
    text = torch.where(drop[:, None, None], e_text.to(text.dtype).expand_as(text), text)
    mask = torch.where(drop[:, None], e_mask.expand_as(mask), mask)
    return text, mask


def flow_matching_loss(model, x0: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity."""
    t = sample_timesteps(x0.shape[0], x0.device) if t is None else t
    x_t, v = noisy_inputs(x0, t, torch.randn_like(x0))
    return F.mse_loss(model(x_t, t, text, mask).float(), v.float())
