"""The hires fix (A1111's "Hires. fix"): draw at the model's size, upscale the images in pixels, then
refine them at the larger size with img2img, so that a model trained at one size draws larger images
without repeating its subject across them.

    from bonsai.hires import generate_hires
    result = generate_hires(pipe, "red apple, twemoji style", scale=2, hires_strength=0.5, seed=1)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch
from PIL import Image

from .limits import HIRES_STRENGTH, MAX_SIDE
from .pipeline import Generation, InvalidRequest, Pipeline

UPSCALERS = ("lanczos",)
# (pass, passes, step, total, x0 estimate [B, C, H, W]) -> None
HiresCallback = Callable[[int, int, int, int, torch.Tensor], None]


def upscale(images: list[Image.Image], width: int, height: int, upscaler: str = "lanczos") -> list[Image.Image]:
    """Pixel upscale for the second pass (LANCZOS is the only upscaler so far)."""
    if upscaler not in UPSCALERS:
        raise InvalidRequest(f"upscaler {upscaler!r} is not one of {', '.join(UPSCALERS)}")
    return [im.resize((width, height), Image.LANCZOS) for im in images]


def hires_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """width x height times `scale`, each side rounded to the nearest multiple the model takes."""
    return tuple(max(multiple, int(round(side * scale / multiple)) * multiple) for side in (width, height))


def generate_hires(
    pipe: Pipeline,
    prompt: str,
    *,
    scale: float = 2.0,
    hires_strength: float = HIRES_STRENGTH,
    hires_steps: int | None = None,
    upscaler: str = "lanczos",
    batch: int = 1,
    callback: HiresCallback | None = None,
    **first: Any,
) -> Generation:
    """Pipeline.generate(prompt, batch, **first), upscaled by `scale` and refined by img2img at
    `hires_strength` over `hires_steps` steps (default: the first pass's). Returns the second pass, each
    image's parameters naming the first pass as A1111 does (and its img2img strength, when it had an
    init image); its warnings are both passes'."""
    if scale <= 1:
        raise InvalidRequest(f"hires scale must be above 1, got {scale:g}")
    w0, h0 = first.get("width") or pipe.defaults.width, first.get("height") or pipe.defaults.height
    width, height = hires_size(w0, h0, scale, pipe.size_multiple)
    if max(width, height) > MAX_SIDE:  # refused before the first pass, not after it
        raise InvalidRequest(f"hires scale {scale:g} turns {w0}x{h0} into {width}x{height}, over {MAX_SIDE} px a side: "
                             "lower the scale or the size")
    step = lambda stage: None if callback is None else (lambda s, t, x0: callback(stage, 2, s, t, x0))  # noqa: E731
    base = pipe.generate(prompt, batch=batch, callback=step(1), **first)
    p = base.params[0]
    common = {k: v for k, v in first.items() if k not in ("steps", "width", "height", "strength", "init_images")}
    common["seed"] = p.seed
    second = pipe.generate(
        prompt, batch=batch, callback=step(2), init_images=upscale(base.images, width, height, upscaler),
        strength=hires_strength, steps=hires_steps or p.steps, width=width, height=height, **common,
    )
    note = (f", Hires upscale: {scale:g}, Hires upscaler: {upscaler}, "
            f"First pass size: {p.width}x{p.height}, First pass steps: {p.steps}"
            + (f", First pass denoising strength: {p.strength:g}" if p.strength < 1 else ""))  # an img2img first pass
    for image in second.images:
        image.info["parameters"] += note
    return replace(second, warnings=list(dict.fromkeys(base.warnings + second.warnings)))
