"""Every denoiser as `v = model(x_t, t, text, mask[, pooled])`, the signature distillation and
the flow loss use: Bonsai DiTs have it; diffusers models get a thin wrapper that maps t in [0, 1]
to their timestep convention and the text conditioning (token states, mask, pooled embedding, as
the pipeline's encode_prompt returns them) to their inputs.

Inputs come in the flow-matching form x_t = (1 - t) x0 + t n. Models trained on a DDPM
(variance-preserving) schedule, SD UNets and PixArt, never saw that form: they get the same
point of the diffusion at equal signal-to-noise ratio, x_t / sqrt((1 - t)^2 + t^2) at the
(fractional) timestep whose alpha-bar has SNR ((1 - t) / t)^2."""

from __future__ import annotations

import torch
from torch import nn

# Models trained on a DDPM schedule (epsilon or v prediction), not on flow matching.
VP_KINDS = ("UNet2DConditionModel", "PixArtTransformer2DModel")

_TEXT_DIM = {
    "UNet2DConditionModel": "cross_attention_dim",
    "SD3Transformer2DModel": "joint_attention_dim",
    "FluxTransformer2DModel": "joint_attention_dim",
    "PixArtTransformer2DModel": "caption_channels",
    "SanaTransformer2DModel": "caption_channels",
}


class DiffusersDenoiser(nn.Module):
    """A diffusers UNet / SD3 / FLUX / PixArt / Sana model behind
    (x_t [B,C,H,W], t [B] in [0,1], text [B,L,E], mask [B,L] bool, pooled [B,P] or None).

    The prediction is the model's raw output (epsilon for SD UNets, velocity for flow models):
    distillation matches student to teacher on it, whatever it parameterizes. FLUX latents are
    packed into 2x2 patches here (as FluxPipeline does) and unpacked on the way out.

    vae_scale: pixels per latent (SDXL's size conditioning is in pixels); guidance: the
    embedded guidance of guidance-distilled FLUX (dev) models; alphas_cumprod [T]: the training
    schedule of a DDPM-trained model (VP_KINDS; default: Stable Diffusion's scaled-linear one)."""

    def __init__(self, model: nn.Module, vae_scale: int = 8, guidance: float = 3.5, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.kind = type(model).__name__
        self.vae_scale = vae_scale
        self.guidance = guidance
        if self.kind not in _TEXT_DIM:
            raise ValueError(f"distillation of {self.kind} is not supported yet ({', '.join(_TEXT_DIM)} are)")
        if self.kind in VP_KINDS:
            ab = (alphas_cumprod if alphas_cumprod is not None else sd_alphas_cumprod()).double()
            # log-SNR per training timestep, decreasing in the timestep: the table vp_input inverts
            self.register_buffer("_log_snr", (ab.log() - (-ab).log1p()).float(), persistent=False)

    def vp_input(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t rescaled to unit signal + noise variance, fractional DDPM timestep [B]) of equal SNR."""
        t = t.float().clamp(1e-4, 1 - 1e-4)
        log_snr = 2 * ((-t).log1p() - t.log())
        table = self._log_snr.to(t.device).flip(0)  # increasing, index i = timestep T - 1 - i
        hi = torch.searchsorted(table, log_snr).clamp(1, len(table) - 1)
        lo = hi - 1
        frac = ((log_snr - table[lo]) / (table[hi] - table[lo])).clamp(0, 1)
        timestep = (len(table) - 1) - (lo + frac)
        scale = torch.rsqrt((1 - t) ** 2 + t**2).view(-1, *([1] * (x.dim() - 1)))
        return x * scale.to(x.dtype), timestep.to(x.dtype)

    def text_dim(self) -> int:
        """Width E of the text states the model expects."""
        return self.model.config[_TEXT_DIM[self.kind]]

    def pooled_dim(self) -> int:
        """Width P of the pooled text embedding the model needs (0: none)."""
        cfg = self.model.config
        if self.kind == "UNet2DConditionModel":
            return cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim if cfg.addition_embed_type == "text_time" else 0
        return cfg.pooled_projection_dim if self.kind in ("SD3Transformer2DModel", "FluxTransformer2DModel") else 0

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        """(C, H, W) of the latents the model denoises at `size` x `size` latent pixels."""
        channels = self.model.config.in_channels
        if self.kind == "FluxTransformer2DModel":
            if size % 2:
                raise ValueError(f"FLUX packs 2x2 latent patches: the latent size must be even, got {size}")
            channels //= 4
        return channels, size, size

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooled_dim() and pooled is None:
            raise ValueError(f"{self.kind} needs the pooled text embedding (encode the prompts with the pipeline's text encoders)")
        if self.kind == "FluxTransformer2DModel":
            return self._flux(x, t, text, pooled)
        timestep = t * 1000
        if self.kind in VP_KINDS:
            x, timestep = self.vp_input(x, t)
        if self.kind == "UNet2DConditionModel":
            extra = {}
            if pooled is not None:  # SDXL: pooled text + (original size, crop, target size) in pixels, as the pipeline passes them
                h, w = x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale
                ids = torch.tensor([h, w, 0, 0, h, w], dtype=x.dtype, device=x.device)
                extra["added_cond_kwargs"] = {"text_embeds": pooled.to(x.dtype), "time_ids": ids.expand(x.shape[0], 6)}
            return self.model(x, timestep, encoder_hidden_states=text, **extra).sample
        if self.kind == "SD3Transformer2DModel":
            return self.model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, pooled_projections=pooled).sample
        out = self.model(x, encoder_hidden_states=text, encoder_attention_mask=mask.long(), timestep=timestep).sample
        return out[:, : x.shape[1]]  # PixArt also predicts a variance channel block

    def _flux(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        B, C, H, W = x.shape
        packed = FluxPipeline._pack_latents(x, B, C, H, W)  # [B, H/2 * W/2, 4C]
        img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = torch.full((B,), self.guidance, device=x.device, dtype=torch.float32) if self.model.config.guidance_embeds else None
        out = self.model(hidden_states=packed, timestep=t, guidance=guidance, pooled_projections=pooled, encoder_hidden_states=text,
                         txt_ids=txt_ids, img_ids=img_ids).sample  # FLUX takes t in [0, 1] (it scales by 1000 itself)
        return FluxPipeline._unpack_latents(out, H, W, 1)


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's (and PixArt's) training schedule: "scaled_linear" betas, alpha-bar [steps]."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def scheduler_alphas_cumprod(pipeline_dir) -> torch.Tensor | None:
    """alpha-bar of the pipeline folder's scheduler (any diffusers DDPM-family scheduler config),
    or None when the folder has none or its scheduler is not a DDPM one (flow matching)."""
    from pathlib import Path

    folder = Path(pipeline_dir) / "scheduler" if pipeline_dir else None
    if folder is None or not (folder / "scheduler_config.json").is_file():
        return None
    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(str(folder))
    if "FlowMatch" in config.get("_class_name", ""):
        return None
    return DDPMScheduler.from_config(config).alphas_cumprod.double()
