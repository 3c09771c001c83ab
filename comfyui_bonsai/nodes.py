"""Bonsai nodes for ComfyUI, in the classic (V1) node interface: INPUT_TYPES / RETURN_TYPES /
FUNCTION. They are thin: parse the inputs, call the bonsai library, hand back ComfyUI types.

A Bonsai model travels between nodes as a BONSAI_PIPELINE (a bonsai.pipeline.Pipeline: 1-bit
denoiser, text encoder, decoder). The sampler runs Bonsai's own flow-matching sampler and returns
a ComfyUI IMAGE ([B, H, W, 3] float32 in [0, 1]) that Save Image, Preview Image or any image node
takes. Nodes never change a pipeline they receive (ComfyUI caches node outputs and may feed one
to several nodes): quantize and LoRA work on a copy of the denoiser.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from bonsai.format import CheckpointError, read_header
from bonsai.hub import Store
from bonsai.limits import CFG_RANGE, MAX_BATCH, MAX_SIDE, MAX_STEPS, last_seed
from bonsai.lora import apply_lora
from bonsai.pipeline import Pipeline
from bonsai.quant import DEFAULT_KEEP, SCHEMES, BinarizeConfig, QuantPolicy, quantize_
from bonsai.sampling import SAMPLERS

from .comfy_env import LORA_FOLDER, MODEL_FOLDERS, folder_files, step_hook, torch_device

CATEGORY = "Bonsai"
PIPELINE = "BONSAI_PIPELINE"
DEVICES = ("comfy", "auto", "cpu", "cuda")


def _is_bonsai_checkpoint(path: Path) -> bool:
    """True for a file whose header is a valid Bonsai checkpoint header of a model these loaders take (reads the
    header only): a diffusers model converted by bonsai quantize needs its diffusers pipeline, which they lack."""
    try:
        return not read_header(path).metadata["architecture"].startswith("diffusers:")
    except CheckpointError:
        return False


def bonsai_models() -> dict[str, str]:
    """Choice shown in the loader -> what Pipeline.from_pretrained takes. The Bonsai store's names
    (the built-in bonsai-emoji first), then Bonsai checkpoints found in ComfyUI's model folders."""
    choices = {ref: ref for ref in Store.default().known_refs()}
    for name, path in folder_files(MODEL_FOLDERS):
        if name not in choices and _is_bonsai_checkpoint(path):
            choices[name] = str(path)
    return choices


def lora_files() -> dict[str, Path]:
    return dict(folder_files((LORA_FOLDER,)))


def with_denoiser(pipe: Pipeline, denoiser: torch.nn.Module) -> Pipeline:
    """A pipeline sharing `pipe`'s text encoder and decoder, with another denoiser."""
    out = copy.copy(pipe)
    out.denoiser = denoiser
    return out


def to_comfy_image(samples: torch.Tensor) -> torch.Tensor:
    """Bonsai samples [B, 3, H, W] in [-1, 1] -> ComfyUI IMAGE [B, H, W, 3] float32 in [0, 1]."""
    return ((samples.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous().cpu()


class BonsaiCheckpointLoader:
    """Load a Bonsai checkpoint (1-bit DiT) with the text encoder and decoder it names."""

    DESCRIPTION = "Loads a Bonsai 1-bit checkpoint: the built-in bonsai-emoji, the Bonsai model store, or a file in models/diffusion_models, models/unet or models/checkpoints."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "ckpt_name": (list(bonsai_models()), {"tooltip": "Bonsai checkpoint (store name or file)"}),
                "device": (list(DEVICES), {"default": "comfy", "tooltip": "comfy: the device ComfyUI uses (honours --cpu)"}),
            }
        }

    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, ckpt_name: str, device: str) -> tuple[Pipeline]:
        source = bonsai_models().get(ckpt_name)
        if source is None:
            raise ValueError(f"Bonsai checkpoint {ckpt_name!r} not found: put it in models/diffusion_models or run 'bonsai models pull'")
        return (Pipeline.from_pretrained(source, device=torch_device() if device == "comfy" else device),)


class BonsaiSampler:
    """Prompt -> images with Bonsai's flow-matching sampler (classifier-free guidance)."""

    DESCRIPTION = "Generates images from a prompt with a Bonsai pipeline. Shift, width and height 0 take the model's own."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "pipeline": (PIPELINE,),
                "prompt": ("STRING", {"multiline": True, "default": "grinning face, noto"}),
                "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
                # any seed the widget draws must leave room for the largest batch
                "seed": ("INT", {"default": 0, "min": 0, "max": last_seed(MAX_BATCH), "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": MAX_STEPS}),
                "cfg": ("FLOAT", {"default": 4.0, "min": CFG_RANGE[0], "max": CFG_RANGE[1], "step": 0.1, "round": 0.01}),
                "sampler": (list(SAMPLERS), {"default": "euler"}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                    "tooltip": "time shift: > 1 spends more steps at high noise; 0 = the model's (as bonsai generate)"}),
                "width": ("INT", {"default": 0, "min": 0, "max": MAX_SIDE, "step": 8}),
                "height": ("INT", {"default": 0, "min": 0, "max": MAX_SIDE, "step": 8}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(
        self, pipeline: Pipeline, prompt: str, negative_prompt: str, seed: int, steps: int, cfg: float,
        sampler: str, shift: float, width: int, height: int, batch_size: int,
    ) -> tuple[torch.Tensor]:
        hook = step_hook(steps)
        result = pipeline.generate(
            prompt, batch=batch_size, callback=lambda step, total, x0: hook(step),
            negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg, sampler=sampler, shift=shift or None,
            width=width or None, height=height or None,
        )
        return (to_comfy_image(result.samples),)


class BonsaiLoRA:
    """Attach a LoRA (diffusers/PEFT or kohya layout, from models/loras) to a Bonsai model."""

    DESCRIPTION = "Adds a LoRA from models/loras to a Bonsai model as a bf16 side branch (the 1-bit weights stay as they are). Chain several to stack them."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "pipeline": (PIPELINE,),
                "lora_name": (list(lora_files()),),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            }
        }

    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, pipeline: Pipeline, lora_name: str, strength: float) -> tuple[Pipeline]:
        path = lora_files().get(lora_name)
        if path is None:
            raise ValueError(f"LoRA {lora_name!r} not found in ComfyUI's models/loras folder")
        if strength == 0:  # as ComfyUI's LoraLoader: the input itself (see BonsaiModelLoRA.apply)
            return (pipeline,)
        denoiser = copy.deepcopy(pipeline.denoiser)
        apply_lora(denoiser, path, weight=strength)
        return (with_denoiser(pipeline, denoiser),)


def keep_patterns(architecture: str) -> tuple[str, ...]:
    """Layers that stay high precision: the conversion adapter's list for a diffusers model, else Bonsai's default."""
    from bonsai.convert.adapters import PREFIX, adapter_for

    if architecture.startswith(PREFIX):
        return adapter_for(architecture.removeprefix(PREFIX)).keep
    return DEFAULT_KEEP


class BonsaiQuantize:
    """Binarize the full-precision layers of a loaded model to 1 bit (post-training, no distillation)."""

    DESCRIPTION = "Quantizes every large Linear/Conv2d of the model to 1 bit, keeping embeddings, norms, timestep/modulation and first/last layers in high precision. Layers that are 1-bit already are left alone."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "pipeline": (PIPELINE,),
                "scheme": (list(SCHEMES), {"default": BinarizeConfig().scheme}),
                "group_size": ("INT", {"default": BinarizeConfig().group_size, "min": 0, "max": 4096, "step": 8, "tooltip": "0: no per-group scales"}),
                "rank": ("INT", {"default": BinarizeConfig().rank, "min": 0, "max": 256, "tooltip": "low-rank bf16 residual (0: none)"}),
                "keep_extra": ("STRING", {"default": "", "tooltip": "more comma-separated fnmatch patterns of layers to keep"}),
            }
        }

    RETURN_TYPES = (PIPELINE, "INT")
    RETURN_NAMES = ("pipeline", "layers_quantized")
    FUNCTION = "quantize"
    CATEGORY = CATEGORY

    def quantize(self, pipeline: Pipeline, scheme: str, group_size: int, rank: int, keep_extra: str) -> tuple[Pipeline, int]:
        extra = tuple(p.strip() for p in keep_extra.split(",") if p.strip())
        keep = keep_patterns(pipeline.metadata.get("architecture", "")) + extra
        policy = QuantPolicy(binarize=BinarizeConfig(scheme, group_size, rank), keep=keep)
        denoiser = copy.deepcopy(pipeline.denoiser)
        names = quantize_(denoiser, policy)
        return (with_denoiser(pipeline, denoiser), len(names))


NODE_CLASS_MAPPINGS = {
    "BonsaiCheckpointLoader": BonsaiCheckpointLoader,
    "BonsaiSampler": BonsaiSampler,
    "BonsaiLoRA": BonsaiLoRA,
    "BonsaiQuantize": BonsaiQuantize,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "BonsaiCheckpointLoader": "Load Bonsai Checkpoint",
    "BonsaiSampler": "Bonsai Sampler",
    "BonsaiLoRA": "Bonsai LoRA",
    "BonsaiQuantize": "Bonsai Quantize (1-bit)",
}
