"""Triton kernels for bitmatmul on CUDA: W1A16 (bf16/fp16 activations) and W1A8 (int8 activations).

Importing registers "triton-w1a16" and "triton-w1a8" with the dispatcher; without the `triton`
package the import raises ImportError, which the dispatcher tolerates. Automatic choice on CUDA is
W1A16: W1A8 was faster than W1A16 on some large single GEMMs, but slower end to end on bonsai-4b
(76.7 vs 65.5 ms per step on an H200, benchmarks/RESULTS.md) and less accurate (relative error ~9e-3
against ~2e-3), so it runs only when forced: `BONSAI_KERNEL=triton-w1a16|triton-w1a8|reference`.
"""

from __future__ import annotations

import torch

from ..dispatch import Kernel, register_kernel
from ..packed import PackedWeight
from .ops import TileConfig, quantize_rows, w1a8, w1a8_supports_group, w1a16

def _supports_w1a16(x: torch.Tensor, weight: PackedWeight) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _never_automatic(x: torch.Tensor, weight: PackedWeight) -> bool:
    return False


register_kernel(Kernel("triton-w1a8", ("cuda",), w1a8, _never_automatic))
register_kernel(Kernel("triton-w1a16", ("cuda",), w1a16, _supports_w1a16))

__all__ = ["TileConfig", "quantize_rows", "w1a16", "w1a8", "w1a8_supports_group"]
