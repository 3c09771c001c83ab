"""Classifier-free guidance: conditional and unconditional predictions in one batched forward."""

from __future__ import annotations

from typing import Callable

import torch


def cfg_velocity(
    denoiser: Callable[..., torch.Tensor],
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor],
    scale: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap denoiser(x, t, text, mask) into model(x, t) = v_u + scale (v_c - v_u).

    cond/uncond are (text states [B, L, E], mask [B, L]); with scale == 1 the unconditional
    pass is skipped."""
    text_c, mask_c = cond
    if scale == 1.0:
        return lambda x, t: denoiser(x, t, text_c, mask_c)
    text = torch.cat([uncond[0], text_c])
    mask = torch.cat([uncond[1], mask_c])

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_u, v_c = denoiser(torch.cat([x, x]), torch.cat([t, t]), text, mask).chunk(2)
        return v_u + scale * (v_c - v_u)

    return model
