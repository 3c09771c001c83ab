"""Triton kernels for bitmatmul on CUDA: W1A16 (bf16/fp16 activations) and W1A8 (int8 activations).

Importing registers "triton-w1a16" and "triton-w1a8" with the dispatcher; without the `triton`
package the import raises ImportError, which the dispatcher tolerates. Automatic choice on CUDA:
W1A8 for at least W1A8_MIN_M rows on weights of at least W1A8_MIN_WEIGHTS entries (where it measured
faster than W1A16 on an H200, see benchmarks/RESULTS.md), else W1A16. W1A8 trades accuracy for
that speed (relative error ~9e-3 against ~2e-3). `BONSAI_KERNEL=triton-w1a16|triton-w1a8|reference`
forces one.
"""

from __future__ import annotations

import torch

from ..dispatch import Kernel, register_kernel
from ..packed import PackedWeight
from .ops import TileConfig, quantize_rows, w1a8, w1a8_supports_group, w1a16

W1A8_MIN_M = 1024
W1A8_MIN_WEIGHTS = 1 << 23  # N * K; below this (e.g. 384-wide layers) W1A16 measured faster at every M


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def _supports_w1a16(x: torch.Tensor, weight: PackedWeight) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _supports_w1a8(x: torch.Tensor, weight: PackedWeight) -> bool:
    large = _rows(x) >= W1A8_MIN_M and weight.out_features * weight.in_features >= W1A8_MIN_WEIGHTS
    return large and _supports_w1a16(x, weight) and w1a8_supports_group(weight.group_size)


# Later registrations are tried first: W1A8 where it applies, W1A16 otherwise.
register_kernel(Kernel("triton-w1a16", ("cuda",), w1a16, _supports_w1a16))
register_kernel(Kernel("triton-w1a8", ("cuda",), w1a8, _supports_w1a8))

__all__ = ["W1A8_MIN_M", "W1A8_MIN_WEIGHTS", "TileConfig", "quantize_rows", "w1a16", "w1a8"]
