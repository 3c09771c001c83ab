"""The emoji training bundle on disk and its loader.

Two safetensors files and a JSON list, sized to travel (< ~60 MB together; ~20 MB without states):
- images.safetensors: `webp` uint8 [total bytes] (lossless WebP of each 64x64 RGB image, concatenated),
  `offsets` int64 [N + 1] (image i is webp[offsets[i]:offsets[i+1]]).
- text_states.safetensors (optional: a trainer that carries the text encoder encodes captions
  itself; the evaluator reads them): MiniLM token states of each caption, real tokens only (no padding),
  quantized per token: `codes` uint8 (the signed integers q in [-(2^(b-1)-1), 2^(b-1)-1] stored as
  q + 2^(b-1), b bits each, packed little-endian: 4 six-bit codes per 3 bytes, or one byte each for
  b = 8), `scales` float16 [T] (state = q * scale), `lengths` int16 [N] (real tokens per caption,
  T = sum). The metadata gives bits, hidden size and max_tokens.
- captions.json: [{caption, style, name, short_name, split, source, set}] in the same order.

The loader needs torch, safetensors and Pillow only (no transformers, no npm)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_write

IMAGES_FILE = "images.safetensors"
STATES_FILE = "text_states.safetensors"
CAPTIONS_FILE = "captions.json"
FORMAT = "bonsai-emoji-dataset"
FORMAT_VERSION = 1
SUPPORTED_BITS = (6, 8)


def quantize_states(states: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of float states [T, D] -> (codes uint8 [T * D * bits / 8]
    packed as described in the module docstring, scales float16 [T])."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"state bits must be one of {SUPPORTED_BITS}, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    scales = (states.float().abs().amax(1) / qmax).clamp(min=1e-8).half()
    q = (states.float() / scales.float()[:, None]).round().clamp(-qmax, qmax).to(torch.int32)
    codes = (q + 2 ** (bits - 1)).flatten()
    if bits == 8:
        return codes.to(torch.uint8), scales
    codes = torch.cat([codes, codes.new_zeros(-len(codes) % 4)]).view(-1, 4)
    word = codes[:, 0] | codes[:, 1] << 6 | codes[:, 2] << 12 | codes[:, 3] << 18
    packed = torch.stack([word & 0xFF, word >> 8 & 0xFF, word >> 16 & 0xFF], 1)
    return packed.flatten().to(torch.uint8), scales


def dequantize_states(codes: torch.Tensor, scales: torch.Tensor, bits: int, hidden: int) -> torch.Tensor:
    """Inverse of `quantize_states`: float32 [T, hidden] with T = len(scales)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"state bits must be one of {SUPPORTED_BITS}, got {bits}")
    count = len(scales) * hidden
    c = codes.to(torch.int32)
    if bits == 6:
        b = c.view(-1, 3)
        word = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16
        c = torch.stack([word & 63, word >> 6 & 63, word >> 12 & 63, word >> 18 & 63], 1).flatten()
    if len(c) < count:
        raise ValueError(f"state codes hold {len(c)} values, expected {count}")
    q = (c[:count] - 2 ** (bits - 1)).float().view(-1, hidden)
    return q * scales.float()[:, None]


def encode_webp(image: np.ndarray) -> bytes:
    """Lossless WebP of a uint8 RGB image [H, W, 3]."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="WEBP", lossless=True, quality=100, method=4)
    return buf.getvalue()


def write_bundle(
    root: Path,
    images_webp: list[bytes],
    states: torch.Tensor | None,
    mask: torch.Tensor | None,
    records: list[dict],
    bits: int,
    metadata: dict[str, str],
) -> dict[str, int]:
    """Write the files atomically. states float [N, T, D], mask bool [N, T] (True = real
    token, real tokens first), or both None for a bundle without states (a stale states file is
    removed). Returns {file name: bytes}."""
    n = len(records)
    if (states is None) != (mask is None):
        raise ValueError("pass both states and mask, or neither")
    if len(images_webp) != n or (states is not None and (states.shape[0] != n or mask.shape != states.shape[:2])):
        shapes = "no states" if states is None else f"states {tuple(states.shape)}, mask {tuple(mask.shape)}"
        raise ValueError(f"bundle parts disagree: {len(images_webp)} images, {shapes}, {n} captions")
    root.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(b) for b in images_webp])
    images = {
        "webp": torch.frombuffer(bytearray(b"".join(images_webp)), dtype=torch.uint8),
        "offsets": torch.from_numpy(offsets.astype(np.int64)),
    }
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "count": str(n), **metadata}
    atomic_write(root / IMAGES_FILE, lambda p: save_file(images, p, metadata={**meta, "image_size": str(metadata.get("image_size", 64))}))
    if states is not None:
        codes, scales = quantize_states(states[mask], bits)
        text = {"codes": codes, "scales": scales, "lengths": mask.sum(1).to(torch.int16)}
        state_meta = {**meta, "bits": str(bits), "hidden_size": str(states.shape[2]), "max_tokens": str(states.shape[1])}
        atomic_write(root / STATES_FILE, lambda p: save_file(text, p, metadata=state_meta))
    elif (root / STATES_FILE).exists():
        (root / STATES_FILE).unlink()
    atomic_write(root / CAPTIONS_FILE, lambda p: Path(p).write_text(json.dumps(records, separators=(",", ":")) + "\n"))
    return {f: (root / f).stat().st_size for f in (IMAGES_FILE, STATES_FILE, CAPTIONS_FILE) if (root / f).exists()}


@dataclass
class EmojiDataset:
    """images float32 [N, 3, 64, 64] in [-1, 1]; states float16 [N, T, 384] (zero where padded)
    and mask bool [N, T], or both None for a bundle without states; captions, styles, splits: lists
    of N strings; records: the N captions.json rows (name, short_name, ...), empty if not loaded."""

    images: torch.Tensor
    states: torch.Tensor | None
    mask: torch.Tensor | None
    captions: list[str]
    styles: list[str]
    splits: list[str]
    records: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def indices(self, split: str) -> torch.Tensor:
        return torch.tensor([i for i, s in enumerate(self.splits) if s == split], dtype=torch.long)

    def subset(self, split: str) -> "EmojiDataset":
        """The records of one split ("train" or "eval"), in order."""
        idx = self.indices(split)
        pick = idx.tolist()
        return EmojiDataset(
            self.images[idx], None if self.states is None else self.states[idx], None if self.mask is None else self.mask[idx],
            [self.captions[i] for i in pick], [self.styles[i] for i in pick], [self.splits[i] for i in pick],
            [self.records[i] for i in pick] if self.records else [],
        )

    def sentence_embeddings(self) -> torch.Tensor:
        """MiniLM sentence embeddings float32 [N, 384]: masked mean of the token states, L2-normalized
        (what TextEncoder.embed computes, from the stored states)."""
        if self.states is None or self.mask is None:
            raise ValueError(f"this dataset was loaded without {STATES_FILE}; rebuild it with `bonsai data emoji` (states on)")
        m = self.mask.unsqueeze(-1).float()
        pooled = (self.states.float() * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; build the dataset with `bonsai data emoji -o {path.parent}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:  # truncated or not safetensors at all
        raise ValueError(f"{path}: not a readable safetensors file ({e}); build the dataset again with `bonsai data emoji -o {path.parent}`") from None
    if meta.get("format") != FORMAT or meta.get("version") != str(FORMAT_VERSION):
        raise ValueError(f"{path}: expected format {FORMAT} version {FORMAT_VERSION}, got {meta.get('format')} {meta.get('version')}")
    return tensors, meta


def _expect(path: Path, tensors: dict[str, torch.Tensor], spec: dict[str, tuple[torch.dtype, int]]) -> None:
    for name, (dtype, ndim) in spec.items():
        t = tensors.get(name)
        if t is None or t.dtype != dtype or t.ndim != ndim:
            got = "missing" if t is None else f"{t.dtype} with {t.ndim} dims"
            raise ValueError(f"{path}: tensor {name!r} should be {dtype} with {ndim} dims, got {got}")


def load_emoji_dataset(root: str | Path) -> EmojiDataset:
    """Load and validate a bundle written by `write_bundle` (see the module docstring); states and
    mask are None when the bundle has no text_states.safetensors."""
    root = Path(root)
    records = json.loads((root / CAPTIONS_FILE).read_text()) if (root / CAPTIONS_FILE).is_file() else None
    if records is None:
        raise FileNotFoundError(f"{root / CAPTIONS_FILE}: missing; build the dataset with `bonsai data emoji -o {root}`")
    n = len(records)
    img_t, img_meta = _read(root / IMAGES_FILE)
    _expect(root / IMAGES_FILE, img_t, {"webp": (torch.uint8, 1), "offsets": (torch.int64, 1)})
    offsets = img_t["offsets"]
    if len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(img_t["webp"]) or (offsets.diff() <= 0).any():
        raise ValueError(f"{root / IMAGES_FILE}: offsets do not split the {len(img_t['webp'])} bytes into {n} images")
    size = int(img_meta.get("image_size", 64))
    data = img_t["webp"].numpy().tobytes()
    pixels = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        img = np.asarray(Image.open(io.BytesIO(data[a:b])).convert("RGB"))
        if img.shape != (size, size, 3):
            raise ValueError(f"{root / IMAGES_FILE}: image {i} is {img.shape}, expected {(size, size, 3)}")
        pixels[i] = img
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    captions = ([r["caption"] for r in records], [r["style"] for r in records], [r["split"] for r in records])
    if not (root / STATES_FILE).is_file():
        return EmojiDataset(images, None, None, *captions, records)
    states, mask = _load_states(root / STATES_FILE, n)
    return EmojiDataset(images, states, mask, *captions, records)


def _load_states(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(states float16 [n, T, D], mask bool [n, T]) from a text_states.safetensors file."""
    st_t, st_meta = _read(path)
    _expect(path, st_t, {"codes": (torch.uint8, 1), "scales": (torch.float16, 1), "lengths": (torch.int16, 1)})
    bits, hidden, max_tokens = (int(st_meta[k]) for k in ("bits", "hidden_size", "max_tokens"))
    lengths = st_t["lengths"].long()
    if len(lengths) != n or int(lengths.sum()) != len(st_t["scales"]) or (lengths < 1).any() or (lengths > max_tokens).any():
        raise ValueError(f"{path}: lengths do not match {n} captions and {len(st_t['scales'])} token scales")
    flat = dequantize_states(st_t["codes"], st_t["scales"], bits, hidden)
    mask = torch.arange(max_tokens)[None, :] < lengths[:, None]
    states = torch.zeros(n, max_tokens, hidden, dtype=torch.float16)
    states[mask] = flat.half()
    return states, mask
