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


ACTIVATION_LEVELS = {"int8": 127.0, "fp8": 448.0}  # largest quantized value: int8's, float8 e4m3's


def quantize_per_token(x: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q [M, K] as floats, scale [M]) rounded as the W1A8 kernels' quantization does it:
    scale = max |row| / level; int8 rounds to floor(v + 0.5) (halves up), fp8 to the nearest e4m3 (ties
    to even)."""
    level = ACTIVATION_LEVELS[activation]
    scale = x.abs().amax(-1).clamp_min(1e-30) / level
    v = x / scale[:, None]
    if activation == "int8":
        return torch.floor(v + 0.5).clamp(-level, level), scale
    return v.clamp(-level, level).to(torch.float8_e4m3fn).to(x.dtype), scale


def _binary_part(weight: PackedWeight) -> torch.Tensor:
    """float32 [N, K]: the signs times row and group scales (column scales go with x)."""
    binary = weight.sign_matrix(torch.float32) * weight.row_scale.float()[:, None]
    if weight.group_scale is not None:
        binary = binary * weight.group_scale.float().repeat_interleave(weight.group_size, dim=1)[:, : weight.in_features]
    return binary


def bitmatmul_w1a8_reference(x: torch.Tensor, weight: PackedWeight, activation: str = "int8") -> torch.Tensor:
    """y = x @ W.T in float32 with the W1A8 kernels' activation rounding: the binary part of W (signs with
    row, group and column scales) multiplies x * col_scale quantized per token; the row offset and the
    low-rank term see x itself. For measuring what the rounding does to a model on a machine without
    the GPU kernels (benchmarks/kernel_quality.py); returns x.dtype."""
    k = weight.in_features
    x2 = x.reshape(-1, k).float()
    xc = x2 if weight.col_scale is None else x2 * weight.col_scale.float()
    q, scale = quantize_per_token(xc, activation)
    y = (q * scale[:, None]) @ weight.prepared("w1a8-reference-binary", _binary_part).T
    if weight.row_offset is not None:
        y = y + x2.sum(-1, keepdim=True) * weight.row_offset.float()
    if weight.lowrank_u is not None:
        y = y + (x2 @ weight.lowrank_v.float().T) @ weight.lowrank_u.float().T
    return y.reshape(*x.shape[:-1], weight.out_features).to(x.dtype)
