"""1-bit matmul kernels behind one dispatch point."""

from .dispatch import Kernel, available_kernels, bitmatmul, register_kernel, set_kernel
from .packed import PackedWeight
from .packing import pack_signs, packed_width, unpack_signs
from .reference import bitmatmul_reference

__all__ = [
    "Kernel",
    "PackedWeight",
    "available_kernels",
    "bitmatmul",
    "bitmatmul_reference",
    "pack_signs",
    "packed_width",
    "register_kernel",
    "set_kernel",
    "unpack_signs",
]
