"""Writing images: PNG with generation parameters in a text chunk, written atomically."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save `image` to `path` with its "parameters" (A1111 format) embedded; never leaves half a file."""
    path = Path(path)
    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask decides the mode, as for any file
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def next_free_paths(directory: Path, seeds: list[int]) -> list[Path]:
    """Numbered names NNNNN-SEED.png that follow the highest number already in `directory`."""
    numbers = [int(p.name[:5]) for p in directory.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    start = max(numbers, default=0) + 1
    return [directory / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]
