"""LoRA training on a 1-bit base, like QLoRA: the base stays packed (BitLinear, no gradients),
only the LoRA factors (float32) train, on the flow-matching loss of captioned images.

The fast bitmatmul kernels compute the forward only; `input_grads` gives each BitLinear the
input gradient grad_x = grad_y @ W during backward, W dequantized for that one layer at a time
(as QLoRA dequantizes its 4-bit weights), so LoRAs before a 1-bit layer learn through it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import BitLinear
from .distill import Batch, evaluate_loss
from .flow import drop_text, flow_matching_loss
from .images import load_pixels
from .loop import TrainConfig, train


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = ("blocks.*",)  # fnmatch patterns of linear layers that get a LoRA
    batch: int = 8
    drop_text: float = 0.1  # share of samples trained with the empty prompt, so guidance keeps working
    seed: int = 0


@dataclass(frozen=True)
class CaptionedImages:
    """pixels float32 [N, 3, H, W] in [-1, 1]; states float32 [N, L, E]; mask bool [N, L]."""

    pixels: torch.Tensor
    states: torch.Tensor
    mask: torch.Tensor


class _InputGrad(torch.autograd.Function):
    """Forward: y unchanged. Backward: also hands x the gradient grad_y @ W of y = x W^T + b."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, layer: BitLinear) -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        w = ctx.layer.packed.dequantize(torch.float32)  # [N, K], this layer only, freed after
        return None, (grad_y.float() @ w).to(ctx.x_dtype), None


def _attach_input_grad(layer: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
    x = args[0]
    if torch.is_grad_enabled() and x.requires_grad and not y.requires_grad:  # the kernel cut x off the graph
        return _InputGrad.apply(y, x, layer)
    return None


@contextmanager
def input_grads(model: nn.Module):
    """Inside the block every BitLinear of `model` passes gradients to its input (see module docstring)."""
    hooks = [m.register_forward_hook(_attach_input_grad) for m in model.modules() if isinstance(m, BitLinear)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def encode_captions(text_encoder, captions: list[str], chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (states float32 [N, L, E], mask bool [N, L]) on the CPU, `chunk` captions at a time."""
    parts = [text_encoder.encode(captions[i:i + chunk]) for i in range(0, len(captions), chunk)]
    return torch.cat([s.float().cpu() for s, _ in parts]), torch.cat([m.cpu() for _, m in parts])


def fit_tokens(states: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (zero states, mask False) or cut [B, L, E] / [B, L] to `length` tokens."""
    pad = length - states.shape[1]
    if pad <= 0:
        return states[:, :length], mask[:, :length]
    return F.pad(states, (0, 0, 0, pad)), F.pad(mask, (0, pad))


def folder_data(text_encoder, files: list[Path], captions: list[str], width: int, height: int) -> CaptionedImages:
    """Images (from bonsai.train.images.captioned_images) at width x height, with encoded captions."""
    return CaptionedImages(load_pixels(files, width, height), *encode_captions(text_encoder, captions))


def bundle_data(text_encoder, root: str | os.PathLike[str], width: int, height: int, minilm: bool) -> CaptionedImages:
    """The train split of a Bonsai dataset bundle (bonsai.data.load_emoji_dataset). Its stored MiniLM
    states are used when the model's text encoder is MiniLM (`minilm`); else the captions are encoded."""
    from ..data import load_emoji_dataset

    data = load_emoji_dataset(root).subset("train")
    if not len(data):
        raise ValueError(f"{root}: the bundle has no 'train' records")
    states, mask = (data.states.float(), data.mask) if minilm else encode_captions(text_encoder, data.captions)
    return CaptionedImages(resize(data.images, height, width), states, mask)


def resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, 3, h, w] -> [N, 3, height, width] (antialiased), unchanged when the size already fits."""
    if pixels.shape[-2:] == (height, width):
        return pixels
    return F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def lora_batches(
    data: CaptionedImages, empty: tuple[torch.Tensor, torch.Tensor], cfg: LoRAConfig, device: torch.device, seed: int, drop: float,
) -> Iterator[Batch]:
    """Endless (x0, text, mask) batches of cfg.batch random samples; with probability `drop` a
    sample's text is the empty prompt's (`empty`: states [1, L, E], mask [1, L])."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(data.pixels), (cfg.batch,), generator=g)
        text, mask = drop_text(data.states[idx], data.mask[idx], empty, drop, g)
        yield data.pixels[idx].to(device), text.to(device), mask.to(device)


def _loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return flow_matching_loss(model, *batch)


def train_lora(
    model: nn.Module, name: str, data: CaptionedImages, empty: tuple[torch.Tensor, torch.Tensor],
    cfg: LoRAConfig, train_cfg: TrainConfig, run_dir: str | os.PathLike[str],
) -> tuple[float, float]:
    """Add LoRA `name` to `model` (on its device) and train it on `data`; resumable from run_dir.
    Returns the flow-matching loss on fixed probe batches (fixed noise) before and after."""
    from ..lora import add_trainable_lora

    device = next(model.parameters()).device
    empty = fit_tokens(empty[0].float().cpu(), empty[1].cpu(), data.states.shape[1])
    torch.manual_seed(cfg.seed)  # the same initial LoRA on a resumed run
    add_trainable_lora(model, name, cfg.rank, cfg.targets, cfg.alpha)
    probe_batches = lora_batches(data, empty, cfg, device, cfg.seed + 10_000, drop=0.0)
    probe = [next(probe_batches) for _ in range(2)]
    with input_grads(model):
        before = evaluate_loss(_loss, model, probe)
        train(model, _loss, lora_batches(data, empty, cfg, device, cfg.seed, cfg.drop_text), train_cfg, Path(run_dir))
        after = evaluate_loss(_loss, model, probe)
    return before, after
