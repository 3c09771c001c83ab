"""1-bit matmul kernels behind one dispatch point."""

from .dispatch import Kernel, available_kernels, bitmatmul, fused_parts, fuses_rows, register_kernel, set_kernel
from .fusion import Epilogue, Prologue
from .packed import PackedWeight
from .packing import pack_signs, packed_width, unpack_signs
from .reference import bitmatmul_reference

__all__ = [
    "Epilogue",
    "Kernel",
    "PackedWeight",
    "Prologue",
    "available_kernels",
    "bitmatmul",
    "bitmatmul_reference",
    "fused_parts",
    "fuses_rows",
    "pack_signs",
    "packed_width",
    "register_kernel",
    "set_kernel",
    "unpack_signs",
]
