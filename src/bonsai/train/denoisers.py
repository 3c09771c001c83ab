"""Every denoiser as `v = model(x_t, t, text, mask)`, the signature distillation and the flow
loss use: Bonsai DiTs have it; diffusers models get a thin wrapper that maps t in [0, 1] to their
timestep convention and text to their conditioning inputs."""

from __future__ import annotations

import torch
from torch import nn


_TEXT_DIM = {
    "UNet2DConditionModel": "cross_attention_dim",
    "SD3Transformer2DModel": "joint_attention_dim",
    "PixArtTransformer2DModel": "caption_channels",
    "SanaTransformer2DModel": "caption_channels",
}


class DiffusersDenoiser(nn.Module):
    """A diffusers UNet / SD3 / PixArt / Sana model behind (x_t [B,C,H,W], t [B] in [0,1], text [B,L,E], mask [B,L]).

    The prediction is the model's raw output (epsilon for SD UNets, velocity for flow models):
    distillation matches student to teacher on it, whatever it parameterizes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.kind = type(model).__name__
        if self.kind not in _TEXT_DIM:
            raise ValueError(f"distillation of {self.kind} is not supported yet (UNet, SD3, PixArt and Sana are)")

    def text_dim(self) -> int:
        """Width E of the text states the model expects."""
        return self.model.config[_TEXT_DIM[self.kind]]

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        timestep = t * 1000
        if self.kind == "UNet2DConditionModel":
            extra = {}
            if self.model.config.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop ids
                pooled = text.mean(1)[:, : self.model.config.projection_class_embeddings_input_dim - 6 * self.model.config.addition_time_embed_dim]
                ids = torch.tensor([x.shape[-2], x.shape[-1], 0, 0, x.shape[-2], x.shape[-1]], dtype=x.dtype, device=x.device)
                extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids.expand(x.shape[0], 6)}
            return self.model(x, timestep, encoder_hidden_states=text, **extra).sample
        if self.kind == "SD3Transformer2DModel":
            pooled = text.mean(1)[:, : self.model.config.pooled_projection_dim]
            return self.model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, pooled_projections=pooled).sample
        out = self.model(x, encoder_hidden_states=text, encoder_attention_mask=mask.long(), timestep=timestep).sample
        return out[:, : x.shape[1]]  # PixArt also predicts a variance channel block
