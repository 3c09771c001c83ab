"""Sample grids during distillation: teacher (top row) and student (bottom row) on the same
fixed prompts and seeds, written to OUT/samples/step-NNNNNN.png.

Bonsai pixel-space DiTs sample with bonsai.sampling's Euler on the flow velocity (the output
is the image); diffusers models sample through their own pipeline (scheduler, latent packing,
VAE decode) with the denoiser swapped and the prompts passed as pre-encoded embeddings, so the
grid shows what that pipeline would generate with each model. No classifier-free guidance:
one model call per step keeps the grid cheap."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..images import save_png
from ..pipeline import to_pil
from ..sampling import flow_timesteps, sample_euler, seeded_noise
from .prompt_encoding import Conditioning

Sampler = Callable[[nn.Module], torch.Tensor]  # model -> images [N, 3, H, W] in [-1, 1]


@dataclass(frozen=True)
class SampleSpec:
    cond: Conditioning  # one entry per grid column (on the models' device)
    seeds: tuple[int, ...]
    shape: tuple[int, int, int]  # (C, H, W) of the denoised tensor
    steps: int = 8


def pixel_sampler(spec: SampleSpec) -> Sampler:
    """Euler sampling of a pixel-space model with the (x, t, text, mask) signature."""

    def sample(model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        c = spec.cond
        return sample_euler(lambda x, t: model(x, t, c.states, c.mask).float(), seeded_noise(spec.shape, spec.seeds).to(device), flow_timesteps(spec.steps, device=device))

    return sample


def _pipeline_kwargs(class_name: str, cond: Conditioning) -> dict:
    """Pre-encoded conditioning in the argument names of each pipeline's __call__."""
    kwargs: dict = {"prompt_embeds": cond.states}
    if cond.pooled is not None:
        kwargs["pooled_prompt_embeds"] = cond.pooled
    if class_name in ("PixArtSigmaPipeline", "PixArtAlphaPipeline", "SanaPipeline"):
        kwargs.update(prompt_attention_mask=cond.mask.long(), use_resolution_binning=False)
    if class_name != "FluxPipeline":  # FLUX's guidance_scale is the embedded guidance, not CFG: keep its default
        kwargs["guidance_scale"] = 1.0
    return kwargs


def diffusers_sampler(pipeline_dir: Path, component: str, teacher: nn.Module, spec: SampleSpec, vae_scale: int) -> Sampler | None:
    """Sampling through the folder's own pipeline (None when it has no VAE to decode with)."""
    import diffusers

    index = json.loads((pipeline_dir / "model_index.json").read_text())
    if not (isinstance(index.get("vae"), list) and index["vae"][1]):
        return None
    device = next(teacher.parameters()).device
    skip = {k: None for k, v in index.items() if isinstance(v, list) and k not in ("vae", "scheduler", component)}
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(str(pipeline_dir), torch_dtype=torch.float32, **{component: teacher}, **skip)
    pipe.vae.to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = _pipeline_kwargs(index["_class_name"], spec.cond)
    _, h, w = spec.shape

    def sample(model: nn.Module) -> torch.Tensor:
        setattr(pipe, component, model)
        generator = [torch.Generator().manual_seed(s) for s in spec.seeds]
        images = pipe(**kwargs, height=h * vae_scale, width=w * vae_scale, num_inference_steps=spec.steps, generator=generator, output_type="pt").images
        return images.float() * 2 - 1

    return sample


def grid(rows: list[torch.Tensor]) -> Image.Image:
    """Rows of images [N, 3, H, W] in [-1, 1] -> one RGB image of len(rows) x N tiles."""
    tiles = [to_pil(r) for r in rows]
    w, h = tiles[0][0].size
    out = Image.new("RGB", (w * len(tiles[0]), h * len(tiles)))
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            out.paste(tile, (j * w, i * h))
    return out


def write_grid(sampler: Sampler, teacher: nn.Module, student: nn.Module, out_dir: Path, step: int) -> Path:
    """Teacher row over student row, at out_dir/samples/step-NNNNNN.png; the student's train/eval mode is restored."""
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            rows = [sampler(teacher), sampler(student)]
    finally:
        student.train(was_training)
    return save_png(grid(rows), out_dir / "samples" / f"step-{step:06d}.png")
