"""Images in and out: input images flattened onto white; PNG with generation parameters in a text
chunk, written atomically."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .atomic import atomic_write

NUMBERED = re.compile(r"^(\d{5,})-.*\.png$")  # NNNNN-SEED.png as next_free_paths names them
# Modes that carry an alpha channel; others may still have a transparent colour (info["transparency"]).
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _gray16_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (PNG's 16-bit grey opens as I;16) as L, or LA where a grey value is
    transparent: Pillow's convert clips 16-bit values at 255, which turns the image nearly white."""
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    gray = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if "transparency" not in image.info:
        return gray
    alpha = np.where(values == image.info["transparency"], 0, 255).astype(np.uint8)
    return Image.merge("LA", (gray, Image.fromarray(alpha, "L")))


def flatten_on_white(image: Image.Image) -> Image.Image:
    """`image` as a new RGB image, its transparent parts composited over white: convert("RGB") alone
    keeps the colour that transparent pixels happen to hold, often black. White, as the emoji
    training images were composited, so an init image's empty background stays empty."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = _gray16_to_8bit(image)
    if image.mode not in ALPHA_MODES and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def save_png(image: Image.Image, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Save `image` to `path` with its "parameters" (A1111 format) embedded; never leaves half a file.
    With overwrite=False an existing `path` raises FileExistsError."""
    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite)


def save_numbered(images: list[Image.Image], seeds: list[int], directory: Path) -> list[Path]:
    """Save images as the next free NNNNN-SEED.png names in `directory`; never over an existing file,
    even one that another run writes at the same moment (it then takes the next number)."""
    names = next_free_paths(directory, seeds)  # one scan of the folder for the whole batch
    paths = []
    for i, image in enumerate(images):
        while True:
            try:
                paths.append(save_png(image, names[i], overwrite=False))
                break
            except FileExistsError:  # taken meanwhile: number this image and the rest after what is there now
                names[i:] = next_free_paths(directory, seeds[i:])
    return paths


def next_free_paths(directory: Path, seeds: list[int]) -> list[Path]:
    """Numbered names NNNNN-SEED.png that follow the highest number already in `directory` (past
    99999 the numbers grow a digit and still count on)."""
    numbers = [int(m.group(1)) for p in directory.glob("*.png") if (m := NUMBERED.match(p.name))]
    start = max(numbers, default=0) + 1
    return [directory / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]
