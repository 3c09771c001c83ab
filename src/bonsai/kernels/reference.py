"""The reference bitmatmul: unpack, dequantize, matmul. It defines correctness for every kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packed import PackedWeight


def bitmatmul_reference(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """y = x @ W.T for x [..., K] (float) and W the dequantized [N, K]; returns [..., N] in x.dtype.

    Low-precision inputs are computed in float32 (bf16/fp16 matmul is slow or missing on CPU)."""
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    w = weight.dequantize(compute)
    return F.linear(x.to(compute), w).to(x.dtype)
