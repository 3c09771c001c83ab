"""Bit packing of sign matrices: exact round trips and the documented byte layout."""

from __future__ import annotations

import pytest
import torch

from bonsai.kernels import pack_signs, packed_width, unpack_signs

SHAPES = [(1, 1), (3, 1), (2, 7), (4, 8), (5, 9), (3, 17), (8, 64), (6, 101)]


def _randn(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_float_input(shape: tuple[int, int]) -> None:
    n, k = shape
    w = _randn(n, k, seed=n * 1000 + k)
    packed = pack_signs(w)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n, packed_width(k)) == (n, (k + 7) // 8)
    expected = torch.where(w >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(packed, k), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_bool_input(shape: tuple[int, int]) -> None:
    n, k = shape
    bits = _randn(n, k, seed=k * 1000 + n) > 0
    packed = pack_signs(bits)
    assert torch.equal(unpack_signs(packed, k) > 0, bits)
    # bool True and +1.0 pack to the same bytes
    assert torch.equal(packed, pack_signs(bits.float() * 2 - 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_unpack_dtype(dtype: torch.dtype) -> None:
    w = _randn(4, 13, seed=3)
    out = unpack_signs(pack_signs(w), 13, dtype)
    assert out.dtype == dtype
    assert torch.equal(out.float(), torch.where(w >= 0, 1.0, -1.0))


def test_documented_layout_on_a_hand_made_example() -> None:
    # bit j of byte b holds column 8b + j, least significant bit first; set bit = +1
    signs = torch.tensor(
        [
            [+1, -1, -1, +1, -1, -1, -1, -1, +1, +1],  # byte 0: bits 0, 3 -> 9; byte 1: bits 0, 1 -> 3
            [-1, -1, -1, -1, -1, -1, -1, +1, -1, +1],  # byte 0: bit 7 -> 128; byte 1: bit 1 -> 2
            [+1, +1, +1, +1, +1, +1, +1, +1, +1, +1],  # 255; padding bits stay 0 -> 3
            [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1],  # 0, 0
        ],
        dtype=torch.float32,
    )
    expected = torch.tensor([[9, 3], [128, 2], [255, 3], [0, 0]], dtype=torch.uint8)
    assert torch.equal(pack_signs(signs), expected)
    assert torch.equal(unpack_signs(expected, 10), signs)


def test_zero_counts_as_plus_one() -> None:
    assert torch.equal(pack_signs(torch.tensor([[0.0, -1.0, 0.0]])), torch.tensor([[0b101]], dtype=torch.uint8))


def test_padding_bits_are_ignored_on_unpack() -> None:
    # K = 3: bits 3..7 are padding; whatever they hold, the three columns read the same
    assert torch.equal(
        unpack_signs(torch.tensor([[0b11111010]], dtype=torch.uint8), 3), torch.tensor([[-1.0, 1.0, -1.0]])
    )


def test_bad_inputs_rejected() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pack_signs(torch.randn(8))
    with pytest.raises(ValueError, match="uint8"):
        unpack_signs(torch.zeros(2, 1, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="K=9"):
        unpack_signs(torch.zeros(2, 1, dtype=torch.uint8), 9)
