"""Caption augmentation for text-to-image training: several prompts per image, one drawn per
example per step, so that short prompts ("grinning face") steer the model as well as the full
training caption ("grinning face, grinning, smileys & emotion, noto style") does.

Variants of one emoji record (dataset captions.json row: caption, name, style, ...), by kind:

| kind          | example                                              | weight |
| ------------- | ---------------------------------------------------- | ------ |
| full          | grinning face, grinning, smileys & emotion, noto style | 0.30 |
| name          | grinning face                                        | 0.25 |
| name_style    | grinning face, noto style                            | 0.15 |
| name_short    | grinning face, grinning                              | 0.10 |
| name_category | grinning face, smileys & emotion, noto style         | 0.10 |
| short         | grinning                                             | 0.10 |

Skin tones stay in words after the name in every variant ("waving hand, dark skin tone").
A kind a record lacks (no short name other than the name) is skipped and the remaining weights
are renormalized for that record. The full caption keeps the largest share so that the exact
training format keeps working; the bare name is next because it is what people type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

EncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # prompts -> (states [B, L, E], mask [B, L])

VARIANT_WEIGHTS: dict[str, float] = {
    "full": 0.30, "name": 0.25, "name_style": 0.15, "name_short": 0.10, "name_category": 0.10, "short": 0.10,
}
_TONE = "skin tone"


def caption_variants(record: dict) -> dict[str, str]:
    """{kind: prompt} for one record (keys of VARIANT_WEIGHTS; kinds the record lacks are left out).

    The caption is '<name>[, <tones>][, <short names>...], <category>, <style> style' (see
    bonsai.data.emoji.build_caption); `name` is '<name>[: <tones>]'."""
    caption, full_name = record["caption"], record["name"]
    name, tones = full_name, ""
    if full_name.endswith(_TONE) and ": " in full_name:
        name, tones = full_name.rsplit(": ", 1)
    head = f"{name}, {tones}" if tones else name
    if not caption.startswith(head + ", "):
        raise ValueError(f"caption {caption!r} does not start with the record's name {head!r}")
    *shorts, category, style = caption[len(head) + 2 :].split(", ")
    variants = {
        "full": caption,
        "name": head,
        "name_style": f"{head}, {style}",
        "name_category": f"{head}, {category}, {style}",
    }
    if shorts and any(c.isalpha() for c in shorts[0]):
        variants["name_short"] = f"{head}, {shorts[0]}"
        variants["short"] = f"{shorts[0]}, {tones}" if tones else shorts[0]
    return variants


def variant_table(records: list[dict], weights: dict[str, float] = VARIANT_WEIGHTS) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """All distinct prompts and, per record, which prompt each kind uses.

    Returns (prompts: list of P distinct strings, index int64 [N, K] into prompts (-1 where a
    record lacks the kind), probs float32 [N, K]: per-record sampling probabilities, rows sum to 1)."""
    kinds = list(weights)
    prompts: dict[str, int] = {}
    index = torch.full((len(records), len(kinds)), -1, dtype=torch.long)
    for i, record in enumerate(records):
        for kind, text in caption_variants(record).items():
            index[i, kinds.index(kind)] = prompts.setdefault(text, len(prompts))
    w = torch.tensor([weights[k] for k in kinds], dtype=torch.float32)
    probs = torch.where(index >= 0, w, torch.zeros(()))
    return list(prompts), index, probs / probs.sum(1, keepdim=True)


def sample_prompts(index: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One prompt id per example: rows int64 [B] (records) -> prompt ids int64 [B], kind drawn
    from each record's probabilities."""
    kind = torch.multinomial(probs[rows], 1, generator=generator).squeeze(1)
    return index[rows, kind]


@dataclass(frozen=True)
class TextBank:
    """Encoded caption variants on the training device.

    states float32 [P, L, E] and mask bool [P, L]: every distinct prompt; index int64 [N, K] and
    probs float32 [N, K]: per record, the prompt of each kind and its probability (variant_table);
    empty: the empty prompt's (states [L, E], mask [L]), for classifier-free-guidance dropout."""

    states: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor
    probs: torch.Tensor
    empty: tuple[torch.Tensor, torch.Tensor]

    def draw(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [B, L, E], mask [B, L]) of one variant per record in rows [B]."""
        ids = sample_prompts(self.index, self.probs, rows, generator)
        return self.states[ids], self.mask[ids]

    def full(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first kind's prompt (the full caption) of each record in rows [B]."""
        ids = self.index[rows, 0]
        return self.states[ids], self.mask[ids]


def encode_text_bank(
    records: list[dict], encode: EncodeFn, device: torch.device | str, weights: dict[str, float] = VARIANT_WEIGHTS, batch_size: int = 1024
) -> TextBank:
    """Encode every variant of `records` (and the empty prompt) once with `encode` (prompts ->
    (states [B, L, E], mask [B, L]), e.g. TextEncoder.encode) and keep them on `device`."""
    prompts, index, probs = variant_table(records, weights)
    parts = [encode(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    states = torch.cat([s.float().to(device) for s, _ in parts])
    mask = torch.cat([m.bool().to(device) for _, m in parts])
    e_states, e_mask = encode([""])
    return TextBank(states, mask, index.to(device), probs.to(device), (e_states[0].float().to(device), e_mask[0].bool().to(device)))
