"""Fragment-major sign words: the weight layout of the register-operand kernels (fragment_kernels.py).

Those kernels compute out^T = W @ x^T, so the unpacked weight is the tensor-core A operand and can
stay in registers (Hopper's wgmma, Ampere's mma.sync both take A from registers). A warp holds the
A operand of a 16-row slice; lane l = 4*r0 + c holds rows r0 and r0 + 8 and, per 16 columns, the
columns 2c, 2c+1 (16-bit types) or 4c..4c+3 (8-bit types), and 8 (16-bit) or 16 (8-bit) further on.
Each lane's bits of one 16-row x 64-column block (bf16) or 16 x 128 block (int8) are stored
together in one or two int32 words, placed so that one shift and one mask turn a word into a
register of two bf16 or four int8 with no shuffle between threads:

- BF16 ("w1a16", chunk of 64 columns, 32 words per 16-row group): row n = 16g + 8rs + r0, column
  k = 64kc + 16j + 8h + 2c + e is bit p + 16e of word [g, kc, 4r0 + c], with p = 8rs + 2j + h.
  A set bit means -1: shifting left by 15 - p puts the two signs of pair p on bits 15 and 31.
- INT8 ("w1a8", chunk of 128 columns, 64 words per group): column k = 128kc + 32t + 16h + 4c + i
  is bit q + 8i of word [g, kc, 2(4r0 + c) + (t // 2)], with q = 4rs + 2(t % 2) + h. A set bit
  means +1: shifting right by q leaves four {0, 1} bytes under the mask 0x01010101.

Rows are padded to a multiple of 16 and columns to the chunk (padding bits: any value, the kernels
mask the activations past K to zero and never store rows past N).
"""

from __future__ import annotations

import torch

from ..packed import PackedWeight

BF16_CHUNK = 64
INT8_CHUNK = 128
GROUP_ROWS = 16


def _sign_bits(weight: PackedWeight, chunk: int) -> torch.Tensor:
    """uint8 [16 * NG, chunk * KC] of 1 (+1) / 0 (-1), zero padded (one byte per weight: the
    largest bonsai-4b layer needs 38 MB for it while it is built, not 8 bytes per weight)."""
    n, k = weight.out_features, weight.in_features
    ng, kc = -(-n // GROUP_ROWS), -(-k // chunk)
    shifts = torch.arange(8, device=weight.device, dtype=torch.uint8)
    bits = (weight.signs[:, :, None] >> shifts) & 1  # [N, KB, 8]
    out = bits.new_zeros(ng * GROUP_ROWS, kc * chunk)
    out[:n, :k] = bits.reshape(n, -1)[:, :k]
    return out


def _to_words(bits: torch.Tensor) -> torch.Tensor:
    """[..., 32] of 0/1 (bit index last) -> int32 [...] with bit i from bits[..., i] (bit 31 is the sign)."""
    words = torch.zeros(bits.shape[:-1], dtype=torch.int32, device=bits.device)
    for i in range(32):  # int32 shifts wrap at bit 31, which is what two's complement wants
        words |= bits[..., i].to(torch.int32) << i
    return words


def bf16_words(weight: PackedWeight) -> torch.Tensor:
    """int32 [NG, KC, 32]: the W1A16 fragment words (set bit = -1)."""
    neg = 1 - _sign_bits(weight, BF16_CHUNK)
    ng, kc = neg.shape[0] // GROUP_ROWS, neg.shape[1] // BF16_CHUNK
    # [g, rs, r0, kc, j, h, c, e] -> [g, kc, r0, c | e, rs, j, h]: bit index e*16 + rs*8 + j*2 + h
    t = neg.reshape(ng, 2, 8, kc, 4, 2, 4, 2).permute(0, 3, 2, 6, 7, 1, 4, 5)
    return _to_words(t.reshape(ng, kc, 32, 32))


def int8_words(weight: PackedWeight) -> torch.Tensor:
    """int32 [NG, KC, 64]: the W1A8 fragment words (set bit = +1)."""
    pos = _sign_bits(weight, INT8_CHUNK)
    ng, kc = pos.shape[0] // GROUP_ROWS, pos.shape[1] // INT8_CHUNK
    # [g, rs, r0, kc, th, tl, h, c, i] -> [g, kc, r0, c, th | i, rs, tl, h]: bit index i*8 + rs*4 + tl*2 + h
    t = pos.reshape(ng, 2, 8, kc, 2, 2, 2, 4, 4).permute(0, 3, 2, 7, 4, 8, 1, 5, 6)
    return _to_words(t.reshape(ng, kc, 64, 32))
