"""The latent decoder: a diffusers AutoencoderKL with only its decoder half kept.

Generation only ever decodes, so the encoder (and the quant conv that feeds it) is dropped at
construction: it is never built, stored or loaded. The convolutions stay in high precision
(bf16 on disk) - they are a small part of the model and the most sensitive one for image detail.

Shapes: latents [B, C, h, w] (C = latent channels, h = H/8) -> images [B, 3, H, W] in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

# A Flux/SD3-style 16-channel autoencoder (8x down-sampling, four stages of 128..512 channels).
FLUX_STYLE_VAE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

TILE_PIXELS = 256  # tiled decode works on 256x256-pixel tiles (32x32 latents), 25% overlap


def downsample_factor(config: dict) -> int:
    """Pixels per latent along one side: 2^(stages - 1)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


class SplitGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state-dict keys) that normalizes large CUDA inputs faster.

    Why: PyTorch's CUDA group norm gives each (sample, group) to one thread block, so a 512x512
    decode at batch 1 reduces 32 groups of a million values on 32 of the GPU's ~130 SMs: 0.34 ms per
    call, half of bonsai-4b's decode time on an H200. Here the statistics come from torch's general
    reduction (which splits long rows across blocks; float32 accumulation) and the normalization and
    affine are one fused multiply-add per element. Elsewhere (CPU, MPS, small inputs) it is nn.GroupNorm."""

    MIN_GROUP = 1 << 18  # values per group from which the split reduction pays (H200: 512 x 128 x 128 and up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or x[0].numel() // self.num_groups < self.MIN_GROUP:
            return super().forward(x)
        return split_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def split_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps) as one reduction (float accumulation) and one
    fused multiply-add."""
    B, C = x.shape[:2]
    var, mean = torch.var_mean(x.reshape(B, groups, -1), dim=-1, correction=0)

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # [B, groups] -> [B, C] (expand: no host sync)
        return t.float()[:, :, None].expand(B, groups, C // groups).reshape(B, C)

    scale = per_channel((var.float() + eps).rsqrt())
    shift = -per_channel(mean) * scale
    if weight is not None:
        scale, shift = scale * weight.float(), shift * weight.float() + bias.float()
    view = (B, C) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))


def use_split_group_norm(module: nn.Module) -> None:
    """Make every nn.GroupNorm under `module` a SplitGroupNorm (in place: same tensors, same keys)."""
    for m in module.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = SplitGroupNorm


class LatentDecoder(nn.Module):
    """Latents -> images through the decoder half of an AutoencoderKL built from `config`
    (AutoencoderKL keyword arguments, e.g. FLUX_STYLE_VAE)."""

    def __init__(self, config: dict):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError as err:
            raise RuntimeError("latent models need diffusers: pip install 'bonsai-diffusion[diffusers]'") from err
        self.config = dict(config)
        self.factor = downsample_factor(config)
        self.latent_channels = config["latent_channels"]
        self.vae = AutoencoderKL(**config)
        self.vae.encoder = None  # decoding only: the encoder is never stored or loaded
        self.vae.quant_conv = None
        use_split_group_norm(self.vae.decoder)

    def set_tiling(self, enabled: bool, tile_pixels: int = TILE_PIXELS) -> None:
        """Decode in overlapping tiles (bounded activation memory at any size) or in one piece."""
        if enabled:
            self.vae.enable_tiling()
            self.vae.tile_sample_min_size = tile_pixels
            self.vae.tile_latent_min_size = tile_pixels // self.factor
        else:
            self.vae.disable_tiling()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, h, w] (the denoiser's output space) -> images [B, 3, 8h, 8w], roughly [-1, 1]."""
        scale = self.config.get("scaling_factor", 1.0)
        shift = self.config.get("shift_factor") or 0.0
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(dtype) / scale + shift, return_dict=False)[0]
