"""Triton kernels for bitmatmul on CUDA: W1A16 (bf16/fp16 activations) and W1A8 (int8 activations).

Importing registers "triton-w1a16" and "triton-w1a8" with the dispatcher; without the `triton`
package the import raises ImportError, which the dispatcher tolerates. Automatic choice on CUDA is
W1A16: W1A8 was faster than W1A16 on some large single GEMMs, but slower end to end on bonsai-4b
(76.7 vs 65.5 ms per step on an H200, benchmarks/RESULTS.md) and less accurate (relative error ~9e-3
against ~2e-3), so it runs only when forced: `BONSAI_KERNEL=triton-w1a16|triton-w1a8|reference`.
Layers under MIN_AUTO_WEIGHTS weights go to the reference path instead: their GEMMs are
launch-bound, and bonsai-emoji (largest layer 320 x 1280) drew 128 images 3.7x faster on an H200
through the reference than through W1A16 (benchmarks/RESULTS.md, "Kernel choice and image quality").
"""

from __future__ import annotations

import torch

from ..dispatch import Kernel, register_kernel
from ..packed import PackedWeight
from .ops import TileConfig, quantize_rows, w1a8, w1a8_supports_group, w1a16

MIN_AUTO_WEIGHTS = 1 << 20  # bonsai-4b's smallest layers (1024 x 1024, text encoder) stay on W1A16


def large_enough(weight: PackedWeight) -> bool:
    """Whether the automatic choice gives this layer to W1A16 (small layers: the reference path)."""
    return weight.out_features * weight.in_features >= MIN_AUTO_WEIGHTS


def _supports_w1a16(x: torch.Tensor, weight: PackedWeight) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and large_enough(weight)


def _never_automatic(x: torch.Tensor, weight: PackedWeight) -> bool:
    return False


register_kernel(Kernel("triton-w1a8", ("cuda",), w1a8, _never_automatic))
register_kernel(Kernel("triton-w1a16", ("cuda",), w1a16, _supports_w1a16))

__all__ = ["MIN_AUTO_WEIGHTS", "TileConfig", "large_enough", "quantize_rows", "w1a16", "w1a8", "w1a8_supports_group"]
