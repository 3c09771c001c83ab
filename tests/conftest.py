"""Shared tiny models for the core tests: one place that builds a random DiT and its 1-bit checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bonsai.kernels import set_kernel
from bonsai.lora import add_trainable_lora, lora_targets, save_lora
from bonsai.models import DiT, DiTConfig, load_model, save_model
from bonsai.quant import QuantPolicy, quantize_

TINY = DiTConfig(hidden_size=32, depth=1, num_heads=2, sample_size=16, patch_size=4)
# What the tiny checkpoint recommends; pipeline and CLI tests read these back.
TINY_DEFAULTS = {"steps": 2, "cfg": 3.0, "width": 16, "height": 16, "sampler": "euler"}


def random_dit(config: DiTConfig = TINY, seed: int = 0) -> DiT:
    """A float DiT whose every Linear weight and bias is drawn N(0, 0.1^2).

    The default init zeroes the modulation and output layers, which would make the model output
    zero and every test of it pass trivially."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DiT(config)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.1)
                nn.init.normal_(module.bias, std=0.1)
    return model.eval()


def tiny_inputs(
    config: DiTConfig = TINY, batch: int = 2, height: int = 16, width: int = 16, tokens: int = 7, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [B, C, H, W], t [B], text [B, L, E], mask [B, L]) with the last two tokens of row 0 padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, height, width, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, tokens, config.text_dim, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, -2:] = False
    return x, t, text, mask


@pytest.fixture
def reference_kernel():
    """Force bitmatmul onto the reference path (fast kernels trade exactness for speed, e.g. the CPU
    kernel quantizes activations to int8; they are checked against the reference in their own tests)."""
    set_kernel("reference")
    yield
    set_kernel(None)


@pytest.fixture
def make_dit() -> Callable[..., DiT]:
    return random_dit


@pytest.fixture
def make_inputs() -> Callable[..., tuple[torch.Tensor, ...]]:
    return tiny_inputs


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random tiny DiT, binarized with the default policy, saved as a Bonsai checkpoint."""
    model = random_dit(TINY, seed)
    quantize_(model, QuantPolicy())
    save_model(
        model,
        path,
        "dit",
        TINY.to_dict(),
        name="tiny-test",
        pipeline={"text_encoder": "minilm", "defaults": TINY_DEFAULTS},
    )
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny 1-bit checkpoint (written once per test session; treat as read-only)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def write_tiny_lora(checkpoint: Path, path: Path, seed: int = 5) -> Path:
    """A rank-2 LoRA on every block layer of `checkpoint`, up factors N(0, 0.5^2) (a fresh LoRA's
    are zero, which would change nothing), saved in the PEFT layout under the name path.stem."""
    model, _ = load_model(checkpoint)
    add_trainable_lora(model, path.stem, rank=2, patterns=("blocks.*",))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for layer in lora_targets(model).values():
            if path.stem in getattr(layer, "ups", {}):
                layer.ups[path.stem].data.normal_(std=0.5)
    save_lora(model, path.stem, path)
    return path


def transparent_image(mode: str, seed: int, size: tuple[int, int] = (16, 16), partial: bool = True) -> tuple[Image.Image, np.ndarray]:
    """A random `mode` image (RGBA, LA, or P with a transparent palette entry) whose fully transparent
    pixels hold black, about a third of them, and its float64 reference over white [H, W, 3]:
    colour * alpha + 255 * (1 - alpha). `partial`: some pixels are half transparent (else alpha is 0 or 255)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "P":
        palette = rng.integers(0, 256, (16, 3))
        palette[0] = 0  # the transparent entry is black
        index = rng.integers(0, 16, (h, w))
        index[rng.random((h, w)) < 1 / 3] = 0
        image = Image.fromarray(index.astype(np.uint8), "P")
        image.putpalette(palette.astype(np.uint8).ravel().tolist())
        image.info["transparency"] = 0
        reference = np.where((index == 0)[..., None], 255.0, palette[index].astype(np.float64))
        return image, reference
    channels = {"RGBA": 3, "LA": 1}[mode]
    colour = rng.integers(0, 256, (h, w, channels))
    alpha = np.where(rng.random((h, w)) < 0.5, 255, rng.integers(1, 255, (h, w)) if partial else 255)
    alpha[rng.random((h, w)) < 1 / 3] = 0
    colour[alpha == 0] = 0
    image = Image.fromarray(np.dstack([colour, alpha]).astype(np.uint8), mode)
    a = alpha[..., None].astype(np.float64) / 255
    reference = np.broadcast_to(colour * a + 255 * (1 - a), (h, w, 3)).astype(np.float64)
    return image, reference
