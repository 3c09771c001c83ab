"""Runs one job spec on a pipeline: txt2img, img2img, and the hires-fix second pass.

The runner owns the loaded pipeline (one model at a time; switching models reloads) and is only
ever called from the worker thread."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from bonsai.hires import generate_hires
from bonsai.pipeline import Pipeline, to_pil

from .models import ModelCatalog
from .spec import JobSpec

# (stage, stages, step, total, x0 estimate [B, C, H, W]) -> None; may raise to cancel the job.
Progress = Callable[[int, int, int, int, torch.Tensor], None]
PipelineLoader = Callable[[Path, str], Pipeline]


def preview_png(x0: torch.Tensor, side: int) -> bytes | None:
    """The first image of a denoised estimate [B, C, H, W] as a small PNG (None if it has < 3 channels)."""
    if x0.shape[1] < 3:
        return None
    image = to_pil(x0[:1, :3])[0]
    image.thumbnail((side, side), Image.NEAREST if max(image.size) < side else Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _load(path: Path, device: str) -> Pipeline:
    return Pipeline.from_pretrained(path, device=device)


class Runner:
    def __init__(self, catalog: ModelCatalog, device: str = "auto", loader: PipelineLoader | None = None):
        self.catalog = catalog
        self.device = device
        self.loader = loader or _load
        self._loaded: tuple[str, Pipeline] | None = None

    def pipeline(self, model: str) -> Pipeline:
        """The pipeline of `model`, loading it (and dropping the previous one) when needed."""
        if self._loaded is None or self._loaded[0] != model:
            self._loaded = None  # free the old model before loading the new one
            info = self.catalog.get(model)
            pipe = self.loader(info.path, self.device)
            pipe.lora_dir = os.fspath(self.catalog.loras_dir)  # where prompt tags `<lora:NAME:W>` find NAME
            self._loaded = (model, pipe)
        return self._loaded[1]

    def run(self, spec: JobSpec, init: Image.Image | None, progress: Progress) -> tuple[list[Image.Image], list[str]]:
        """Generate the job's images, each with its A1111 parameters in .info["parameters"], and the warnings
        of the generation (pipeline.GenerationWarning: a prompt cut short, black images)."""
        pipe = self.pipeline(spec.model)
        # The job's LoRAs act as prompt tags do, and so are written into each image's parameters with the prompt.
        prompt = " ".join([spec.prompt, *(f"<lora:{name}:{weight:g}>" for name, weight in spec.loras)])
        first = dict(
            negative_prompt=spec.negative_prompt, cfg=spec.cfg, seed=spec.seed, sampler=spec.sampler,
            init_images=[init] if init is not None else None, strength=spec.strength,
            steps=spec.steps, width=spec.width, height=spec.height,
        )
        if spec.hires is None:
            one_pass = lambda s, t, x0: progress(1, 1, s, t, x0)  # noqa: E731
            result = pipe.generate(prompt, batch=spec.batch, callback=one_pass, **first)
        else:
            h = spec.hires
            result = generate_hires(pipe, prompt, scale=h.scale, hires_strength=h.strength, hires_steps=h.steps,
                                    upscaler=h.upscaler, batch=spec.batch, callback=progress, **first)
        return result.images, result.warnings
