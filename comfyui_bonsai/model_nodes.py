"""Bonsai nodes on ComfyUI's own types: a Bonsai checkpoint as MODEL + CLIP + VAE (so KSampler,
CLIP Text Encode and VAE Decode drive it), an empty pixel latent, 1-bit quantization of any
MODEL, and LoRA on a (1-bit) MODEL.

ComfyUI itself is imported only when a node runs (comfy_model), so the pack imports without it.
Nodes never change a MODEL they receive: quantize and LoRA return an independent copy.
"""

from __future__ import annotations

import logging

import torch

from bonsai.limits import MAX_SIDE
from bonsai.lora import apply_lora
from bonsai.pipeline import Pipeline
from bonsai.quant import SCHEMES, BinarizeConfig, QuantPolicy

from .binarize_model import binarized_layers, keep_patterns, model_size, size_report
from .comfy_env import intermediate_device, torch_device
from .nodes import CATEGORY, bonsai_models, lora_files

log = logging.getLogger("bonsai")


class BonsaiModelLoader:
    """A pixel-space Bonsai checkpoint as ComfyUI's MODEL, CLIP (its text encoder) and VAE (pixels)."""

    DESCRIPTION = (
        "Loads a Bonsai 1-bit checkpoint (built-in bonsai-emoji, the Bonsai store, or a file in models/diffusion_models, "
        "models/unet, models/checkpoints) as MODEL, CLIP and VAE for KSampler, CLIP Text Encode and VAE Decode."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"ckpt_name": (list(bonsai_models()), {"tooltip": "Bonsai checkpoint (store name or file)"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, ckpt_name: str) -> tuple:
        from . import comfy_model

        source = bonsai_models().get(ckpt_name)
        if source is None:
            raise ValueError(f"Bonsai checkpoint {ckpt_name!r} not found: put it in models/diffusion_models or run 'bonsai models pull'")
        # "lean": weights stay on the CPU; ComfyUI's model management moves them when sampling.
        pipe = Pipeline.from_pretrained(source, device=torch_device(), memory="lean")
        if pipe.decoder is not None:
            raise ValueError(
                f"{ckpt_name} is a latent-space Bonsai model (its own VAE decoder): load it with 'Load Bonsai Checkpoint' "
                "and sample it with 'Bonsai Sampler'"
            )
        model = comfy_model.model_patcher(pipe.denoiser, pipe.defaults.shift)
        return model, comfy_model.text_clip(pipe.text_encoder), comfy_model.pixel_vae()


class BonsaiEmptyLatent:
    """Zero latents [B, 3, H, W] for a pixel-space Bonsai MODEL (KSampler starts from pure noise)."""

    DESCRIPTION = "Empty latent for pixel-space Bonsai models: 3 channels at the image size (bonsai-emoji: 64x64)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "width": ("INT", {"default": 64, "min": 8, "max": MAX_SIDE, "step": 8}),
                "height": ("INT", {"default": 64, "min": 8, "max": MAX_SIDE, "step": 8}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(self, width: int, height: int, batch_size: int) -> tuple[dict]:
        return ({"samples": torch.zeros(batch_size, 3, height, width, device=intermediate_device())},)


class BonsaiQuantizeModel:
    """Binarize the large Linear (optionally Conv2d) layers of any ComfyUI MODEL to packed 1-bit layers."""

    DESCRIPTION = (
        "Returns a copy of the MODEL whose large Linear layers (and Conv2d, if asked) are packed 1-bit Bonsai layers; "
        "embeddings, norms, timestep/modulation and first/last layers stay in high precision. Post-training, no "
        "distillation: expect a quality loss on models not trained for 1 bit. The input MODEL is not changed."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        default = BinarizeConfig()
        return {
            "required": {
                "model": ("MODEL",),
                "scheme": (list(SCHEMES), {"default": default.scheme}),
                "group_size": ("INT", {"default": default.group_size, "min": 0, "max": 4096, "step": 8, "tooltip": "0: no per-group scales"}),
                "rank": ("INT", {"default": default.rank, "min": 0, "max": 256, "tooltip": "low-rank bf16 residual (0: none)"}),
                "convs": ("BOOLEAN", {"default": False, "tooltip": "binarize Conv2d layers too (UNets)"}),
                "keep_extra": ("STRING", {"default": "", "tooltip": "more comma-separated fnmatch patterns of layers to keep"}),
            }
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    FUNCTION = "quantize"
    CATEGORY = CATEGORY

    def quantize(self, model, scheme: str, group_size: int, rank: int, convs: bool, keep_extra: str) -> tuple:
        from . import comfy_model

        extra = tuple(p.strip() for p in keep_extra.split(",") if p.strip())
        diffusion_class = type(model.model.diffusion_model).__name__
        policy = QuantPolicy(BinarizeConfig(scheme, group_size, rank), keep=keep_patterns(diffusion_class, extra), convs=convs)
        made: dict = {}

        def binarize(diffusion_model: torch.nn.Module) -> dict:
            made.update(binarized_layers(diffusion_model, policy))
            return made

        out = comfy_model.independent_copy(model, binarize)
        new = out.model.diffusion_model
        report = size_report(model_size(model.model.diffusion_model), model_size(new), model_size(new, only_bit_layers=True), len(made))
        log.info("Bonsai quantize %s: %s", diffusion_class, report)
        return out, report


class BonsaiModelLoRA:
    """Attach a LoRA from models/loras to a (1-bit) MODEL as a bf16 side branch."""

    DESCRIPTION = (
        "Adds a LoRA (diffusers/PEFT or kohya layout, module names as in the model) to a Bonsai MODEL as a bf16 side "
        "branch; 1-bit layers stay packed (ComfyUI's Load LoRA patches float weights, which 1-bit layers do not have). "
        "Chain several to stack them. The input MODEL is not changed."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": (list(lora_files()),),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, lora_name: str, strength: float) -> tuple:
        path = lora_files().get(lora_name)
        if path is None:
            raise ValueError(f"LoRA {lora_name!r} not found in ComfyUI's models/loras folder")
        if strength == 0:
            # As ComfyUI's LoraLoader: the input MODEL itself. A wrapped layer, even with a zero
            # branch, makes its DiT block leave the fused CPU kernel path for dit.py's forward,
            # whose int8 activations differ slightly, so the image would not be the base one.
            return (model,)
        from . import comfy_model

        out = comfy_model.independent_copy(model)
        apply_lora(out.model.diffusion_model, path, weight=strength)
        return (out,)


NODE_CLASS_MAPPINGS = {
    "BonsaiModelLoader": BonsaiModelLoader,
    "BonsaiEmptyLatent": BonsaiEmptyLatent,
    "BonsaiQuantizeModel": BonsaiQuantizeModel,
    "BonsaiModelLoRA": BonsaiModelLoRA,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "BonsaiModelLoader": "Load Bonsai Model (MODEL, CLIP, VAE)",
    "BonsaiEmptyLatent": "Bonsai Empty Latent (pixels)",
    "BonsaiQuantizeModel": "Quantize MODEL to 1-bit (Bonsai)",
    "BonsaiModelLoRA": "Bonsai LoRA (MODEL)",
}
