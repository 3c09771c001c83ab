"""Binarization schemes, 1-bit layers and the policy that applies them. Pure torch, no file I/O."""

from .binarize import SCHEMES, BinarizeConfig, binarize, fake_quantize
from .layers import BitConv2d, BitConv2dTrain, BitLinear, BitLinearTrain, packed_shapes
from .policy import DEFAULT_KEEP, QuantPolicy, bit_layers, plan, quantize_, to_inference_

__all__ = [
    "SCHEMES",
    "BinarizeConfig",
    "BitConv2d",
    "BitConv2dTrain",
    "BitLinear",
    "BitLinearTrain",
    "DEFAULT_KEEP",
    "QuantPolicy",
    "binarize",
    "bit_layers",
    "fake_quantize",
    "packed_shapes",
    "plan",
    "quantize_",
    "to_inference_",
]
