"""Scaled dot-product attention, in bfloat16 on CPUs that compute bfloat16 natively.

On a CPU with AMX-BF16 or AVX512-BF16, torch's attention runs 2.1x faster in bfloat16 than in float32
at bonsai-4b's 512x512 shapes (1024 tokens, 24 heads of 128), casts included (benchmarks/RESULTS.md,
"CPU, 2026-12-05: attention in bfloat16"); elsewhere bfloat16 is emulated and slower. Its output
then carries bfloat16 rounding (~4e-3 relative), less than the int8 rounding of the activations the
1-bit layers around it already make. Small attentions (fewer than BF16_MIN_SCORES query x key pairs,
bonsai-emoji's 256 tokens among them) stay in float32: their casts would cost about what they save.
BONSAI_CPU_ATTENTION=float32 keeps every attention in float32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

BF16_MIN_SCORES = 512 * 512
_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AMX-BF16 or AVX512-BF16) and bf16 attention is allowed."""
    choice = os.environ.get("BONSAI_CPU_ATTENTION", "auto")
    if choice not in ("auto", "float32"):
        raise ValueError(f"BONSAI_CPU_ATTENTION must be auto or float32, got {choice!r}")
    cpuinfo = Path("/proc/cpuinfo")
    if choice == "float32" or not cpuinfo.exists():
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in _NATIVE_BF16_FLAGS)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask) for q [B, H, T, D], k and v [B, H, S, D]; in
    bfloat16 for large float32 attentions on a CPU that computes bfloat16 natively."""
    if (q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-2] * k.shape[-2] >= BF16_MIN_SCORES
            and cpu_computes_bf16()):
        return F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=attn_mask).float()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
