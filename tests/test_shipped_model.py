"""The shipped bonsai-emoji checkpoint: it validates, its 1-bit layers are packed, and it draws
deterministic, non-degenerate images that the evaluator matches to their prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bonsai
from bonsai.eval import load_evaluator
from bonsai.eval.generate import generate_prompts
from bonsai.eval.metrics import retrieval_ranks
from bonsai.format import load_checkpoint, summarize
from bonsai.kernels import available_kernels, set_kernel
from bonsai.pipeline import Pipeline
from bonsai.quant import BitLinear

WEIGHTS = Path(bonsai.__file__).parent / "weights"
CHECKPOINT = WEIGHTS / "bonsai-emoji.safetensors"
EVALUATOR = WEIGHTS / "emoji-evaluator"

# Training-format captions (train split, Noto style): the candidates of the retrieval check.
CANDIDATES = [
    "rainbow, travel & places, noto style",
    "crescent moon, travel & places, noto style",
    "rose, animals & nature, noto style",
    "four leaf clover, animals & nature, noto style",
    "banana, food & drink, noto style",
    "birthday cake, birthday, food & drink, noto style",
    "party popper, tada, activities, noto style",
    "penguin, animals & nature, noto style",
    "cat face, cat, animals & nature, noto style",
    "dog face, dog, animals & nature, noto style",
    "ghost, smileys & emotion, noto style",
    "pile of poo, hankey, poop, shit, smileys & emotion, noto style",
    "fire, travel & places, noto style",
    "face with tears of joy, joy, smileys & emotion, noto style",
    "rocket, travel & places, noto style",
    "thinking face, smileys & emotion, noto style",
    "t-rex, t rex, animals & nature, noto style",
    "snowman, travel & places, noto style",
    "soccer ball, soccer, activities, noto style",
    "sparkles, activities, noto style",
]
# Measured (8 steps, cfg 4, seed 0 for every prompt, all 20 candidates in one batch; the recipe v2
# checkpoint): 14 of the 20 images rank their own caption in the top 5 among the 20 (chance 25%),
# 5 at rank 0. The three prompts below ranked 0, 0 and 0; the check asks for top 5 each (chance
# that all three pass by luck: 0.25^3 = 1.6%), so it holds with margin and fails if the model stops
# following prompts.
PROMPTS = [CANDIDATES[13], CANDIDATES[8], CANDIDATES[1]]
SEEDS = [0, 0, 0]  # one noise for all: differences between the images come from the prompts alone
STEPS = 8
# Measured on those images (pixels in [-1, 1]): per-image std 0.73 / 0.65 / 0.44; over all 20
# prompts the smallest mean absolute difference between two images is 0.24. A blank or
# washed-out image has std near 0; one image for every prompt has difference 0.
MIN_STD = 0.2
MIN_DIFFERENCE = 0.08


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained(CHECKPOINT, device="cpu")


@pytest.fixture(scope="module")
def images(pipe: Pipeline) -> torch.Tensor:
    return generate_prompts(pipe, PROMPTS, SEEDS, STEPS, cfg=4.0)[0]


def test_checkpoint_validates_and_is_small() -> None:
    ckpt = load_checkpoint(CHECKPOINT)  # header, packed-layer shapes and dtypes, finite values
    assert ckpt.metadata["architecture"] == "dit" and ckpt.layers
    assert all(ckpt.tensors[f"{m}.signs"].dtype == torch.uint8 for m in ckpt.layers)
    info = summarize(CHECKPOINT)
    assert info["file_bytes"] < 16e6  # the repository budget for this model
    assert info["bits_per_weight_1bit"] < 2.5  # 1-bit signs + rank-16 bf16 residual + scales: 2.29 measured


def test_linear_layers_are_packed_1bit(pipe: Pipeline) -> None:
    bit_layers = [m for m in pipe.denoiser.modules() if isinstance(m, BitLinear)]
    assert len(bit_layers) >= 8 * 4  # at least attention + MLP projections of each of the 8 blocks
    for layer in bit_layers:
        assert layer.signs.dtype == torch.uint8
        assert layer.signs.shape[1] == (layer.in_features + 7) // 8
    bit_params = sum(m.signs.shape[0] * m.in_features for m in bit_layers)
    float_params = sum(p.numel() for p in pipe.denoiser.parameters() if p.is_floating_point())
    assert bit_params > float_params  # most of the denoiser's weights are the 1-bit ones


def test_same_seed_gives_identical_images(pipe: Pipeline, images: torch.Tensor) -> None:
    again, _ = generate_prompts(pipe, PROMPTS, SEEDS, STEPS, cfg=4.0)
    assert torch.equal(images, again)


def test_images_are_not_degenerate(images: torch.Tensor) -> None:
    assert images.shape == (3, 3, 64, 64) and torch.isfinite(images).all()
    stds = images.flatten(1).std(1)
    assert (stds > MIN_STD).all(), f"per-image pixel std {stds.tolist()}"
    diffs = (images[:, None] - images[None]).abs().flatten(2).mean(2)
    off_diagonal = diffs[~torch.eye(len(PROMPTS), dtype=torch.bool)]
    assert (off_diagonal > MIN_DIFFERENCE).all(), f"mean absolute differences {off_diagonal.tolist()}"


def test_evaluator_matches_images_to_their_prompts(pipe: Pipeline, images: torch.Tensor) -> None:
    _, image_emb = load_evaluator(EVALUATOR).encode(images)
    text_emb = pipe.text_encoder.embed(CANDIDATES)
    targets = torch.tensor([CANDIDATES.index(p) for p in PROMPTS])
    ranks = retrieval_ranks(image_emb, text_emb, targets)
    assert (ranks < 5).all(), f"ranks of the own caption among {len(CANDIDATES)}: {ranks.tolist()}"


@pytest.mark.skipif("cpu" not in available_kernels(), reason="the compiled CPU kernel is not built")
def test_batch_images_are_the_single_runs_bit_for_bit(pipe: Pipeline) -> None:
    # The CPU kernel rounds activations to int8 per token, so a last-bit difference between a batched and
    # a single product upstream (text encoder, embeddings, modulation) grows into other pixels: image i of
    # a batch must still be the image that its seed in the PNG gives alone.
    set_kernel("cpu")
    try:
        batch = pipe.generate(PROMPTS[0], batch=3, seed=5, steps=STEPS, cfg=4.0, negative_prompt="blurry")
        for i in range(3):
            single = pipe.generate(PROMPTS[0], seed=5 + i, steps=STEPS, cfg=4.0, negative_prompt="blurry")
            gap = (batch.samples[i] - single.samples[0]).abs().max().item()
            assert torch.equal(batch.samples[i], single.samples[0]), f"image {i} differs by up to {gap:.3g}"
    finally:
        set_kernel(None)
