"""Bit packing of sign matrices.

Layout (the on-disk and in-memory contract every kernel reads):
a sign matrix B of shape [N, K] with entries in {-1, +1} is stored as uint8 [N, ceil(K / 8)].
Byte b of row n holds columns 8b .. 8b+7; bit j (least significant bit = bit 0) holds column
8b + j. A set bit means +1, a clear bit means -1. Padding bits past K are 0 and never read.
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def packed_width(in_features: int) -> int:
    """Bytes per packed row for K = in_features."""
    return (in_features + 7) // 8


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a sign matrix [N, K] (bool, or numbers where >= 0 means +1) into uint8 [N, ceil(K/8)]."""
    if signs.dim() != 2:
        raise ValueError(f"pack_signs expects a 2-D [N, K] matrix, got shape {tuple(signs.shape)}")
    bits = signs if signs.dtype == torch.bool else signs >= 0
    n, k = bits.shape
    pad = packed_width(k) * 8 - k
    if pad:
        bits = torch.cat([bits, bits.new_zeros(n, pad)], dim=1)
    groups = bits.reshape(n, -1, 8).to(torch.uint8)
    return (groups * _BIT_WEIGHTS.to(bits.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of pack_signs: uint8 [N, ceil(K/8)] -> [N, K] of -1/+1 in `dtype`."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_signs expects uint8 [N, ceil(K/8)], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_width(in_features):
        raise ValueError(f"packed width {packed.shape[1]} does not match K={in_features}")
    # One gather from a 256 x 8 table of signs is far faster than shifting and masking every bit.
    table = _sign_table(dtype, packed.device)
    return table[packed.long()].reshape(packed.shape[0], -1)[:, :in_features]


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 8]: row b holds the eight signs byte b encodes."""
    key = (dtype, device)
    if key not in _TABLES:
        bits = (torch.arange(256).unsqueeze(-1) & _BIT_WEIGHTS.long()) != 0
        _TABLES[key] = (bits.to(dtype) * 2 - 1).to(device)
    return _TABLES[key]
