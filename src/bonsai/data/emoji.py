"""Emoji records: captions, styles and the held-out split, built from emoji-datasource's `emoji.json`.

Pure functions over the parsed JSON; the images are read by `composite_on_white`. One record is one
image: a base emoji or one of its skin-tone variations, in one style (Noto or Twemoji)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from ..images import flatten_on_white

PACKAGE_VERSION = "16.0.0"
IMAGE_SIZE = 64

# npm set name -> the style words that end every caption of that set
STYLES: dict[str, str] = {"google": "noto style", "twitter": "twemoji style"}

SKIN_TONES: dict[str, str] = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}

ATTRIBUTION = """\
The bonsai-emoji images come from two emoji sets, as packaged by emoji-datasource
(https://github.com/iamcal/emoji-data, MIT, by Cal Henderson / iamcal), version 16.0.0:

- Noto Emoji by Google (https://github.com/googlefonts/noto-emoji), images under the
  Apache License 2.0 (npm package emoji-datasource-google).
- Twemoji by Twitter, Inc. and other contributors (now X Corp.) (https://github.com/jdecked/twemoji),
  graphics licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/)
  (npm package emoji-datasource-twitter).

Images were composited onto a white background; captions were built from emoji.json's names,
short names, categories and skin-tone variations.
"""

EVAL_FRACTION = 0.05


@dataclass(frozen=True)
class EmojiRecord:
    """One image of the dataset. `source` is the PNG's file name inside img/<set>/64/."""

    caption: str
    style: str  # "noto" or "twemoji"
    name: str  # lower-case Unicode name, with the skin tones when a variation
    short_name: str  # the base emoji's first short name (the split key)
    split: str  # "train" or "eval"
    source: str
    emoji_set: str  # npm set: "google" or "twitter"


def split_for(short_name: str, eval_fraction: float = EVAL_FRACTION) -> str:
    """Deterministic split from a hash of the base emoji's short name, so that every style and
    skin tone of one emoji falls on the same side."""
    bucket = int.from_bytes(hashlib.sha256(short_name.encode()).digest()[:8], "big") % 10_000
    return "eval" if bucket < round(eval_fraction * 10_000) else "train"


def skin_tone_words(key: str) -> str:
    """'1F3FB' -> 'light skin tone'; '1F3FB-1F3FF' -> 'light skin tone and dark skin tone'."""
    parts = key.upper().split("-")
    try:
        tones = [SKIN_TONES[p] for p in parts]
    except KeyError as err:
        raise ValueError(f"emoji.json: unknown skin tone code point {err.args[0]!r} in skin_variations key {key!r}") from None
    unique = list(dict.fromkeys(tones))
    return " and ".join(unique)


def build_caption(name: str, short_names: Iterable[str], category: str, style_words: str, tones: str = "") -> str:
    """'grinning face, grinning, smileys & emotion, noto style' (tones after the name when given).
    Short names get spaces for '_'/'-' and are dropped when they only repeat the name."""
    name = name.lower()
    parts = [name]
    if tones:
        parts.append(tones)
    for short in short_names:
        words = short.replace("_", " ").replace("-", " ").strip()
        if words and words != name and words not in parts:
            parts.append(words)
    parts += [category.lower(), style_words]
    return ", ".join(parts)


def emoji_records(
    entries: list[dict[str, Any]], emoji_sets: Iterable[str] = tuple(STYLES), eval_fraction: float = EVAL_FRACTION
) -> list[EmojiRecord]:
    """All images emoji.json lists for the given sets (base emoji and skin variations with
    has_img_<set> true), in a fixed order: set, then emoji.json order, base before its variations."""
    records = []
    for emoji_set in emoji_sets:
        if emoji_set not in STYLES:
            raise ValueError(f"unknown emoji set {emoji_set!r}; expected one of {sorted(STYLES)}")
        style_words = STYLES[emoji_set]
        has_img = f"has_img_{emoji_set}"
        for i, entry in enumerate(entries):
            try:
                name, short_names, category = entry["name"], entry["short_names"], entry["category"]
                image = entry["image"]
            except KeyError as err:
                raise ValueError(f"emoji.json entry {i}: missing field {err.args[0]!r}") from None
            key = short_names[0]
            split = split_for(key, eval_fraction)
            style = style_words.split()[0]
            variants = [("", entry)] + [(skin_tone_words(k), v) for k, v in (entry.get("skin_variations") or {}).items()]
            for tones, item in variants:
                if not item.get(has_img, False):
                    continue
                caption = build_caption(name, short_names, category, style_words, tones)
                full_name = f"{name.lower()}: {tones}" if tones else name.lower()
                records.append(EmojiRecord(caption, style, full_name, key, split, item["image"] if tones else image, emoji_set))
    return records


def composite_on_white(png: bytes | Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode a PNG (any mode), alpha-composite it onto white and return uint8 RGB [size, size, 3]."""
    data = png.read_bytes() if isinstance(png, Path) else png
    img = Image.open(io.BytesIO(data)).convert("RGBA")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(flatten_on_white(img), dtype=np.uint8)
