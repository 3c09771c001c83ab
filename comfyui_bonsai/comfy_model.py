"""A Bonsai model as ComfyUI's own MODEL, CLIP and VAE objects, so that KSampler, CLIP Text
Encode and VAE Decode drive it. Imported only inside ComfyUI (it imports `comfy`).

- MODEL: a comfy.model_patcher.ModelPatcher around BonsaiModel, a comfy.model_base.BaseModel whose
  diffusion_model is the Bonsai DiT itself (module names as in Bonsai checkpoints and LoRA files).
  Sampling is ComfyUI's rectified flow (ModelType.FLOW: CONST parametrisation with
  ModelSamplingDiscreteFlow, as SD3 and AuraFlow), which is Bonsai's convention:
  x_sigma = (1 - sigma) x0 + sigma noise, the DiT predicts v = noise - x0 at t = sigma.
- CLIP: a comfy.sd.CLIP whose encoder is the Bonsai text encoder (MiniLM token states [1, 32, 384]);
  its padding mask travels in the CONDITIONING as "attention_mask".
- VAE: ComfyUI's pixel-space VAE (identity, [-1, 1] <-> [0, 1]) for Bonsai's pixel-space models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base
import torch
from torch import nn

from .binarize_model import copy_with, swaps_for

TOKENS_KEY = "bonsai"


class BonsaiPixelConfig(comfy.supported_models_base.BASE):
    """ComfyUI model config of a pixel-space Bonsai DiT: 3-channel identity latents (the format
    ComfyUI defines for pixel-space models), flow sampling with t = sigma (multiplier 1)."""

    unet_config: ClassVar[dict] = {"disable_unet_model_creation": True}
    unet_extra_config: ClassVar[dict] = {}
    sampling_settings: ClassVar[dict] = {"shift": 1.0, "multiplier": 1.0}
    latent_format = comfy.latent_formats.ChromaRadiance
    memory_usage_factor = 1.0
    supported_inference_dtypes: ClassVar[list] = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, shift: float = 1.0):
        super().__init__(dict(self.unet_config))
        self.sampling_settings = {**self.sampling_settings, "shift": shift}  # this model's own, not the class's


class BonsaiModel(comfy.model_base.BaseModel):
    """BaseModel around a Bonsai DiT: forward(x [B, C, H, W], t [B], text [B, L, E], mask [B, L]) -> v."""

    def __init__(self, config: BonsaiPixelConfig, denoiser: nn.Module, device: torch.device | None = None):
        super().__init__(config, comfy.model_base.ModelType.FLOW, device=device)
        self.diffusion_model = denoiser

    def get_dtype(self) -> torch.dtype:
        return next(self.diffusion_model.parameters()).dtype

    def extra_conds(self, **kwargs: Any) -> dict:
        out = super().extra_conds(**kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(mask)
        return out

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        sigma = t
        dtype = self.get_dtype()
        xc = self.model_sampling.calculate_input(sigma, x).to(dtype)
        text = mm.cast_to_device(c_crossattn, xc.device, dtype)
        mask = kwargs.get("attention_mask")
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=xc.device) if mask is None else mask.to(xc.device).bool()
        # Rectified flow: the DiT's time is sigma itself, whatever multiplier a shift node sets.
        v = self.diffusion_model(xc, sigma.to(xc.device, torch.float32), text, mask).float()
        return self.model_sampling.calculate_denoised(sigma, v, x)


def model_patcher(denoiser: nn.Module, shift: float) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI MODEL for a pixel-space Bonsai DiT (kept on the offload device until sampling)."""
    offload = mm.unet_offload_device()
    base = BonsaiModel(BonsaiPixelConfig(shift), denoiser.to(offload), device=offload)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=offload)


class PromptTokenizer:
    """ComfyUI's tokenizer side: hands the prompt text on (the Bonsai encoder tokenizes it itself;
    ComfyUI's "(word:1.2)" weights are not applied)."""

    def __init__(self, embedding_directory: Any = None, tokenizer_data: dict | None = None):
        pass

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict[str, str]:
        return {TOKENS_KEY: text}

    def untokenize(self, token_weight_pair: Any) -> Any:
        return token_weight_pair

    def state_dict(self) -> dict:
        return {}


class BonsaiTextModel(nn.Module):
    """ComfyUI's text-encoder side: tokens -> (token states [1, L, E], no pooled output, {"attention_mask": [1, L]})."""

    def __init__(self, encoder: nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None, model_options: dict | None = None):
        super().__init__()
        self.encoder = encoder.to(device) if device is not None else encoder  # stays float32: small, and fp16 MiniLM drifts
        self.dtypes = {torch.float32}

    def encode_token_weights(self, tokens: dict[str, str]) -> tuple[torch.Tensor, None, dict[str, torch.Tensor]]:
        states, mask = self.encoder.encode([tokens[TOKENS_KEY]])
        return states.to(mm.intermediate_device()), None, {"attention_mask": mask.to(mm.intermediate_device())}

    def reset_clip_options(self) -> None:
        pass

    def set_clip_options(self, options: dict) -> None:
        pass

    def load_sd(self, sd: dict) -> Any:
        return self.encoder.load_state_dict(sd, strict=False)


def text_clip(encoder: nn.Module) -> comfy.sd.CLIP:
    """A ComfyUI CLIP whose encoder is `encoder` (any object with encode(prompts) -> (states, mask))."""
    target = comfy.supported_models_base.ClipTarget(PromptTokenizer, BonsaiTextModel)
    target.params = {"encoder": encoder}
    n_params = sum(p.numel() for p in encoder.parameters())
    return comfy.sd.CLIP(target=target, parameters=n_params, model_options={"dtype": torch.float32})


def pixel_vae() -> comfy.sd.VAE:
    """ComfyUI's pixel-space VAE: LATENT [-1, 1] <-> IMAGE [0, 1], no network."""
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def independent_copy(
    model: comfy.model_patcher.ModelPatcher, replace: Callable[[nn.Module], dict[str, nn.Module]] | None = None
) -> comfy.model_patcher.ModelPatcher:
    """A MODEL that shares no weights with `model`: its weights as `model` sees them (with the
    patches of LoRA or merge nodes applied), copied, except that the diffusion model's modules named
    by replace(diffusion_model) become the modules it gives (so 1-bit layers are swapped in without
    copying the float weights they replace).

    The source MODEL is unchanged; the copy gets its own ModelPatcher (ComfyUI then loads and
    offloads the two independently) with the source's model options (attention patches, cfg functions)."""
    mm.load_models_gpu([model], force_patch_weights=True, force_full_load=True)
    base = model.model
    swaps: dict[int, Any] = swaps_for(base.diffusion_model, replace(base.diffusion_model)) if replace else {}
    if getattr(base, "current_patcher", None) is not None:
        swaps[id(base.current_patcher)] = None
    new_base = copy_with(base, swaps)
    for m in new_base.modules():  # ComfyUI's per-load bookkeeping belongs to the source's patcher
        if hasattr(m, "comfy_patched_weights"):
            del m.comfy_patched_weights
    new_base.model_loaded_weight_memory, new_base.lowvram_patch_counter = 0, 0
    new_base.model_lowvram, new_base.current_weight_patches_uuid = False, None
    new_base.current_patcher = None
    new_base.to(model.offload_device)
    new_base.device = model.offload_device
    out = comfy.model_patcher.ModelPatcher(new_base, load_device=model.load_device, offload_device=model.offload_device)
    out.model_options = copy.deepcopy(model.model_options)  # as ModelPatcher.clone does
    return out
