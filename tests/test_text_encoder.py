"""The plain-PyTorch MiniLM encoder equals transformers' BertModel on the real weights."""

import random

import torch
from transformers import AutoModel, AutoTokenizer

from bonsai.text import TextEncoder
from bonsai.text.minilm import MAX_TOKENS, minilm_path

WORDS = "grinning face red apple dog cat skin tone noto twemoji style smileys emotion food drink a of the".split()


def test_token_states_match_transformers_in_float64() -> None:
    rng = random.Random()  # fresh prompts every run, of every length up to past the token limit
    prompts = ["", "grinning face"] + [" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(6)]
    ours = TextEncoder()
    states, mask = ours.encode(prompts)

    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    reference = AutoModel.from_pretrained(path, local_files_only=True).eval().double()
    batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state

    assert torch.equal(mask, batch["attention_mask"].bool()), "tokenization differs from transformers'"
    real = mask[..., None].double()
    rel = ((states.double() - expected) * real).norm() / (expected * real).norm()
    assert rel < 1e-5, f"relative error {rel:.2e} against float64 transformers"
