"""PackedWeight: a 1-bit weight matrix as every kernel receives it.

The dequantized weight of output row n, input column k is

    W[n, k] = row_scale[n] * group_scale[n, k // group_size] * col_scale[k] * B[n, k]
              + row_offset[n] + (lowrank_u @ lowrank_v)[n, k]

where B is the sign matrix (see packing.py for the bit layout) and every optional factor
defaults to 1 (scales) or 0 (offset, low rank) when absent. Kernels compute y = x @ W.T
without materializing W in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .packing import packed_width, unpack_signs

SCALE_DTYPE = torch.float32
GROUP_SCALE_DTYPE = torch.float16
LOWRANK_DTYPE = torch.bfloat16


@dataclass(eq=False)
class PackedWeight:
    """A packed 1-bit weight [N, K] with its scales. Tensors live on one device."""

    signs: torch.Tensor  # uint8 [N, ceil(K/8)]
    in_features: int  # K
    row_scale: torch.Tensor  # float32 [N]
    group_size: int = 0  # G; 0 = no group scales
    group_scale: torch.Tensor | None = None  # float16 [N, ceil(K/G)]
    col_scale: torch.Tensor | None = None  # float32 [K]
    row_offset: torch.Tensor | None = None  # float32 [N]
    lowrank_u: torch.Tensor | None = None  # bfloat16 [N, r]
    lowrank_v: torch.Tensor | None = None  # bfloat16 [r, K]
    # Per-kernel prepared layouts (e.g. a re-tiled copy for a GPU kernel), built once on first use.
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def out_features(self) -> int:
        return self.signs.shape[0]

    @property
    def device(self) -> torch.device:
        return self.signs.device

    @property
    def rank(self) -> int:
        return 0 if self.lowrank_u is None else self.lowrank_u.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (absent optional ones left out)."""
        names = ("signs", "row_scale", "group_scale", "col_scale", "row_offset", "lowrank_u", "lowrank_v")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def validate(self) -> None:
        """Raise ValueError naming the field if shapes or dtypes break the contract."""
        n, k = self.signs.shape[0], self.in_features
        expect: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "signs": ((n, packed_width(k)), torch.uint8),
            "row_scale": ((n,), SCALE_DTYPE),
        }
        if self.group_size:
            expect["group_scale"] = ((n, -(-k // self.group_size)), GROUP_SCALE_DTYPE)
        elif self.group_scale is not None:
            raise ValueError("group_scale given but group_size is 0")
        if self.col_scale is not None:
            expect["col_scale"] = ((k,), SCALE_DTYPE)
        if self.row_offset is not None:
            expect["row_offset"] = ((n,), SCALE_DTYPE)
        if (self.lowrank_u is None) != (self.lowrank_v is None):
            raise ValueError("lowrank_u and lowrank_v must be given together")
        if self.lowrank_u is not None:
            r = self.lowrank_u.shape[-1]
            expect["lowrank_u"] = ((n, r), LOWRANK_DTYPE)
            expect["lowrank_v"] = ((r, k), LOWRANK_DTYPE)
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if t is None:
                raise ValueError(f"{name} is missing (group_size={self.group_size})")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")

    def to(self, device: torch.device | str) -> "PackedWeight":
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return PackedWeight(in_features=self.in_features, group_size=self.group_size, **moved)

    def prepared(self, key: str, build: Callable[["PackedWeight"], Any]) -> Any:
        """Return self.cache[key], building it with build(self) the first time."""
        if key not in self.cache:
            self.cache[key] = build(self)
        return self.cache[key]

    def sign_matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return unpack_signs(self.signs, self.in_features, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Full-precision W [N, K] (for reference paths and tests; kernels never call this)."""
        w = self.sign_matrix(dtype) * self.row_scale.to(dtype)[:, None]
        if self.group_scale is not None:
            w = w * self.group_scale.to(dtype).repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
        if self.col_scale is not None:
            w = w * self.col_scale.to(dtype)[None, :]
        if self.row_offset is not None:
            w = w + self.row_offset.to(dtype)[:, None]
        if self.lowrank_u is not None:
            w = w + self.lowrank_u.to(dtype) @ self.lowrank_v.to(dtype)
        return w
