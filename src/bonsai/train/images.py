"""Training images from a folder, with or without captions.

Captioned folder layout (`bonsai train-lora --images DIR`), the first that exists wins:
- DIR/captions.jsonl: one JSON object a line, {"file": "cat.png", "caption": "a cat, noto"};
- DIR/captions.txt: one line per image, `FILE<TAB>CAPTION`;
- otherwise a same-name .txt next to each image (cat.png + cat.txt holding the caption), as kohya uses.
Images are .png / .jpg / .jpeg / .webp files directly in DIR; every image needs a caption, and
a caption file may name only images that exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The images directly in `folder`, sorted by name; ValueError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def load_pixels(files: list[Path], width: int, height: int) -> torch.Tensor:
    """Images resized to width x height -> float32 [N, 3, H, W] in [-1, 1]."""
    from ..pipeline import from_pil

    images = []
    for f in files:
        try:
            images.append(Image.open(f))
        except (OSError, UnidentifiedImageError):
            raise ValueError(f"{f}: not a readable image") from None
    return from_pil(images, width, height)


def _caption_table(folder: Path) -> dict[str, str] | None:
    """File name -> caption from captions.jsonl or captions.txt; None when neither exists."""
    if (path := folder / "captions.jsonl").is_file():
        table = {}
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                table[str(row["file"])] = str(row["caption"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f'{path}:{i}: expected {{"file": "NAME.png", "caption": "..."}}') from None
        return table
    if (path := folder / "captions.txt").is_file():
        table = {}
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            name, tab, caption = line.partition("\t")
            if not tab or not caption.strip():
                raise ValueError(f"{path}:{i}: expected FILE<TAB>CAPTION")
            table[name.strip()] = caption
        return table
    return None


def captioned_images(folder: str | os.PathLike[str]) -> tuple[list[Path], list[str]]:
    """(image files, their captions) in the layout of the module docstring; ValueError naming the
    file and what is missing otherwise."""
    files = image_files(folder)
    folder = Path(folder)
    table = _caption_table(folder)
    if table is None:
        table = {f.name: f.with_suffix(".txt").read_text(encoding="utf-8") for f in files if f.with_suffix(".txt").is_file()}
        source = "a same-name .txt file"
    else:
        source = "captions.jsonl" if (folder / "captions.jsonl").is_file() else "captions.txt"
        unknown = sorted(table.keys() - {f.name for f in files})
        if unknown:
            raise ValueError(f"{folder / source}: names {len(unknown)} image(s) not in the folder, e.g. {unknown[0]!r}")
    captions = [" ".join(table.get(f.name, "").split()) for f in files]
    missing = [f.name for f, c in zip(files, captions) if not c]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} of {len(files)} image(s) have no caption in {source}, e.g. {missing[0]!r}; "
                         "see `bonsai train-lora --help` for the layout")
    return files, captions
