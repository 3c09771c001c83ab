"""Scaled dot-product attention, in bfloat16 on CPUs that compute bfloat16 natively (bonsai.cpu_bf16).

There torch's attention runs 2.1x faster in bfloat16 than in float32 at bonsai-4b's 512x512 shapes
(1024 tokens, 24 heads of 128), casts included (benchmarks/RESULTS.md, "CPU, 2026-12-05: attention
and decoding in bfloat16"). Its output then carries bfloat16 rounding (~4e-3 relative); forced on
bonsai-emoji, that moved the images about as much as the 1-bit layers' int8 activations do (median
37.5 against 38.0 dB PSNR). Small attentions (fewer than BF16_MIN_MACS multiply-adds per sample in
q k.T, heads x queries x keys x head size; bonsai-emoji's 21M among them) stay in float32: their casts
would cost about what they save. bonsai-4b's cross-attention (1024 queries, 64 text tokens, 201M) ran
9.1 ms in float32 and 6.2 ms in bfloat16, casts and key mask included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import cpu_bf16

BF16_MIN_MACS = 1 << 25


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask) for q [B, H, T, D], k and v [B, H, S, D]; in
    bfloat16 for large float32 attentions on a CPU that computes bfloat16 natively."""
    heads, queries, size = q.shape[-3:]
    if (q.device.type == "cpu" and q.dtype == torch.float32 and heads * queries * k.shape[-2] * size >= BF16_MIN_MACS
            and cpu_bf16.cpu_computes_bf16()):
        return F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=attn_mask).float()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
