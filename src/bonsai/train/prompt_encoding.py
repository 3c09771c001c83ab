"""Text conditioning for distilling a diffusers denoiser: the prompts encoded once by the
pipeline's own text encoder(s), through diffusers' `encode_prompt` of the pipeline class named
in model_index.json, so the teacher sees exactly what it sees when generating.

The encoders are loaded without the denoiser and the VAE, used once, and dropped; what stays is
a `Conditioning` of a few tensors per prompt."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


class PromptEncodingError(ValueError):
    """A pipeline folder whose text encoder(s) cannot be loaded or used."""


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompts: states [N, L, E] float32, mask [N, L] bool (True = token attended),
    pooled [N, P] float32 for models with a pooled text input (SDXL, SD3, FLUX), else None."""

    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.states.shape[0]

    def select(self, idx: list[int] | torch.Tensor) -> Conditioning:
        return Conditioning(self.states[idx], self.mask[idx], None if self.pooled is None else self.pooled[idx])

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning(self.states.to(device), self.mask.to(device), None if self.pooled is None else self.pooled.to(device))


Encoded = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # states, mask or None (all tokens), pooled or None


def _sd(pipe, prompts: list[str], device) -> Encoded:
    states, _ = pipe.encode_prompt(prompts, device, 1, False)
    return states, None, None


def _sdxl(pipe, prompts: list[str], device) -> Encoded:
    states, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return states, None, pooled


def _sd3(pipe, prompts: list[str], device) -> Encoded:
    states, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False)
    return states, None, pooled


def _flux(pipe, prompts: list[str], device) -> Encoded:
    states, pooled, _ = pipe.encode_prompt(prompts, None, device=device)
    return states, None, pooled


def _t5_masked(pipe, prompts: list[str], device) -> Encoded:
    """PixArt and Sana: T5 / Gemma states with their attention mask; Sana's default instruction
    prefix (the one its __call__ uses) is kept so the conditioning matches generation."""
    extra = {}
    if "complex_human_instruction" in inspect.signature(pipe.encode_prompt).parameters:
        extra["complex_human_instruction"] = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    states, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device, **extra)
    return states, mask, None


ENCODERS: dict[str, Callable[[object, list[str], torch.device], Encoded]] = {
    "StableDiffusionPipeline": _sd,
    "StableDiffusionXLPipeline": _sdxl,
    "StableDiffusion3Pipeline": _sd3,
    "FluxPipeline": _flux,
    "PixArtSigmaPipeline": _t5_masked,
    "PixArtAlphaPipeline": _t5_masked,
    "SanaPipeline": _t5_masked,
}


def text_components(pipeline_dir: Path) -> list[str]:
    """Names of the text encoders a pipeline folder holds (empty if none are saved)."""
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    return [k for k, v in index.items() if k.startswith("text_encoder") and isinstance(v, list) and v[0] and v[1]]


def load_text_pipeline(pipeline_dir: Path, device: torch.device):
    """The folder's pipeline with only its text encoders, tokenizers and scheduler loaded."""
    import diffusers

    index = json.loads((pipeline_dir / "model_index.json").read_text())
    class_name = index.get("_class_name", "")
    if class_name not in ENCODERS:
        raise PromptEncodingError(
            f"{pipeline_dir / 'model_index.json'}: prompt encoding for {class_name!r} is not supported "
            f"({', '.join(ENCODERS)} are); drop --prompts to distill on random text states"
        )
    skip = {k: None for k, v in index.items() if not k.startswith(("_", "text_encoder", "tokenizer", "scheduler")) and isinstance(v, list)}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(str(pipeline_dir), torch_dtype=dtype, **skip)
    except Exception as e:  # diffusers/transformers raise many types for missing or broken files
        raise PromptEncodingError(
            f"{pipeline_dir}: cannot load the text encoder(s) {', '.join(text_components(pipeline_dir))} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); repair those folders or drop --prompts"
        ) from None
    return pipe.to(device)


@torch.no_grad()
def encode_prompts(pipeline_dir: Path, prompts: list[str], device: torch.device, chunk: int = 16) -> Conditioning:
    """Every prompt encoded by the pipeline's own encoder(s) (in chunks of `chunk`); the encoders
    are freed before returning. Result on `device`, float32."""
    pipe = load_text_pipeline(pipeline_dir, device)
    encode = ENCODERS[type(pipe).__name__]
    parts = []
    try:
        for i in range(0, len(prompts), chunk):
            parts.append(encode(pipe, prompts[i : i + chunk], device))
    except Exception as e:
        raise PromptEncodingError(f"{pipeline_dir}: encoding prompts with {type(pipe).__name__}.encode_prompt failed ({type(e).__name__}: {e})") from None
    del pipe
    states = torch.cat([p[0].float() for p in parts])
    mask = torch.cat([torch.ones(p[0].shape[:2], dtype=torch.bool, device=device) if p[1] is None else p[1].bool() for p in parts])
    pooled = None if parts[0][2] is None else torch.cat([p[2].float() for p in parts])
    return Conditioning(states, mask, pooled)
