"""Triton kernels for bitmatmul on CUDA: W1A16 (bf16/fp16 activations) and W1A8 (int8 activations).

Importing registers "triton-w1a16" and "triton-w1a8" with the dispatcher; without the `triton`
package the import raises ImportError, which the dispatcher tolerates. Automatic choice on CUDA:
W1A8 (fragment kernels) for products of at least W1A8_MIN_ROWS rows, where it beats cuBLAS bf16
and W1A16 (bonsai-4b: 44.9 vs 55.9 ms per step on an H200, benchmarks/RESULTS.md); W1A16 below,
where int8 quantization does not pay (and for group sizes the fragment W1A8 cannot take). W1A8 is
less exact (relative error ~9e-3 against ~2e-3; on bonsai-emoji 36 dB PSNR against the reference
path's images, Fréchet distance unchanged). `BONSAI_KERNEL=triton-w1a16|triton-w1a8|reference`
forces one. (W1A8 on float8 e4m3 activations, ops.w1a8(activation="fp8"), is not registered: on an H200,
Triton 3.6 compiled it wrong for most of its tiles.) Layers under MIN_AUTO_WEIGHTS
weights go to the reference path instead: their GEMMs are launch-bound, and bonsai-emoji (largest
layer 320 x 1280) drew 128 images 3.7x faster on an H200 through the reference than through W1A16
(benchmarks/RESULTS.md, "Kernel choice and image quality").
"""

from __future__ import annotations

import torch

from ..dispatch import Kernel, register_kernel
from ..packed import PackedWeight
from . import ops
from .fragments import INT8_CHUNK
from .ops import (
    W1A8_FUSES, W1A16_FUSES, TileConfig, fragment_supports_group, quantize_rows, w1a8, w1a8_supports_group, w1a16,
)  # fmt: skip

MIN_AUTO_WEIGHTS = 1 << 20  # bonsai-4b's smallest layers (1024 x 1024, text encoder) stay on Triton
W1A8_MIN_ROWS = 1024  # rows of x (tokens x batch) from which W1A8 is chosen
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def large_enough(weight: PackedWeight) -> bool:
    """Whether the automatic choice gives this layer to W1A16 (small layers: the reference path)."""
    return weight.out_features * weight.in_features >= MIN_AUTO_WEIGHTS


def _supports_w1a16(x: torch.Tensor, weight: PackedWeight) -> bool:
    return x.is_cuda and x.dtype in _DTYPES and large_enough(weight)


def _supports_w1a8(x: torch.Tensor, weight: PackedWeight) -> bool:
    rows = x.numel() // max(1, x.shape[-1])
    return (_supports_w1a16(x, weight) and rows >= W1A8_MIN_ROWS and ops.DEFAULT_VARIANT != "k-major"
            and fragment_supports_group(weight.group_size, INT8_CHUNK))


# Later registrations are asked first: W1A8 where it applies, else W1A16. Both add the bias, GELU, the head
# norms and the gated residual in their epilogue; W1A8 also runs the prologue (LayerNorm, modulation) as it
# quantizes x.
register_kernel(Kernel("triton-w1a16", ("cuda",), w1a16, _supports_w1a16, fuses_bias=True, fuses=W1A16_FUSES))
register_kernel(Kernel("triton-w1a8", ("cuda",), w1a8, _supports_w1a8, fuses_bias=True, fuses=W1A8_FUSES))

__all__ = ["MIN_AUTO_WEIGHTS", "W1A8_FUSES", "W1A8_MIN_ROWS", "W1A16_FUSES", "TileConfig", "large_enough", "quantize_rows", "w1a16", "w1a8", "w1a8_supports_group"]
