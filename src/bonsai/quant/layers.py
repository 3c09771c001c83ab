"""1-bit layers in two forms.

- Inference: `BitLinear` / `BitConv2d` hold packed signs and scales as buffers and call
  `bitmatmul`; no float weight exists.
- Training: `BitLinearTrain` / `BitConv2dTrain` hold latent float weights, binarize them in the
  forward pass with a straight-through sign (quantization-aware training / distillation).

`to_train_form` / `to_inference_form` convert between them with identical outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.dispatch import bitmatmul
from ..kernels.fusion import Epilogue, Prologue
from ..kernels.packed import GROUP_SCALE_DTYPE, LOWRANK_DTYPE, SCALE_DTYPE, PackedWeight
from ..kernels.packing import packed_width
from .binarize import BinarizeConfig, binarize, binary_factors, fake_quantize, lowrank_residual

_PACKED_FIELDS = ("signs", "row_scale", "group_scale", "col_scale", "row_offset", "lowrank_u", "lowrank_v")


class BitLinear(nn.Module):
    """y = x W^T + b with W a packed 1-bit matrix [N, K]. State: the PackedWeight tensors + bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: BinarizeConfig = BinarizeConfig(),
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        n, k = out_features, in_features
        shapes = packed_shapes(n, k, config)
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(n, device=device), requires_grad=False) if bias else None
        self._packed: PackedWeight | None = None

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None, config: BinarizeConfig) -> "BitLinear":
        layer = cls(packed.in_features, packed.out_features, bias is not None, config, device="meta")
        for name, t in packed.tensors().items():
            setattr(layer, name, t)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return layer

    def _apply(self, fn, recurse: bool = True):
        # .to(device) moves the packed tensors; .to(dtype) / .half() must not cast them: their
        # dtypes are the storage contract (uint8 signs, float32 scales, ...).
        originals = {name: t for name in _PACKED_FIELDS if (t := self._buffers.get(name)) is not None}
        super()._apply(fn, recurse)
        for name, t in originals.items():
            if self._buffers[name].dtype != t.dtype:
                self._buffers[name] = t.to(self._buffers[name].device)
        return self

    def __getstate__(self) -> dict:
        # The packed view may hold kernel caches (C structs) that cannot be copied or pickled: a
        # copy (copy.deepcopy of a model, an EMA copy) rebuilds it from the buffers on first use.
        return {**super().__getstate__(), "_packed": None}

    @property
    def packed(self) -> PackedWeight:
        """The PackedWeight view of the buffers (rebuilt when they were replaced or moved)."""
        if self._packed is None or self._packed.signs is not self.signs:
            fields = {name: getattr(self, name, None) for name in _PACKED_FIELDS}
            self._packed = PackedWeight(in_features=self.in_features, group_size=self.config.group_size, **fields)
        return self._packed

    def forward(self, x: torch.Tensor, prologue: Prologue | None = None, epilogue: Epilogue | None = None) -> torch.Tensor:
        """epilogue(prologue(x) @ W.T + b): the optional row operations run inside the kernel where it
        fuses them (bonsai.kernels.fusion)."""
        return bitmatmul(x, self.packed, self.bias, prologue, epilogue)

    def extra_repr(self) -> str:
        c = self.config
        return f"in={self.in_features}, out={self.out_features}, scheme={c.scheme}, group={c.group_size}, rank={c.rank}"


def packed_shapes(n: int, k: int, config: BinarizeConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the tensors of a packed [N, K] weight under `config`."""
    shapes = {"signs": ((n, packed_width(k)), torch.uint8), "row_scale": ((n,), SCALE_DTYPE)}
    if config.group_size:
        shapes["group_scale"] = ((n, math.ceil(k / config.group_size)), GROUP_SCALE_DTYPE)
    if config.scheme == "onebit":
        shapes["col_scale"] = ((k,), SCALE_DTYPE)
    if config.scheme == "mean":
        shapes["row_offset"] = ((n,), SCALE_DTYPE)
    if config.rank:
        shapes["lowrank_u"] = ((n, config.rank), LOWRANK_DTYPE)
        shapes["lowrank_v"] = ((config.rank, k), LOWRANK_DTYPE)
    return shapes


class BitLinearTrain(nn.Module):
    """Training form of BitLinear: latent float weight, binarized on the fly (straight-through)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, config: BinarizeConfig):
        super().__init__()
        self.config = config
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float().clone()
        self.weight = nn.Parameter(w)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.lowrank_u = self.lowrank_v = None
        if config.rank:
            with torch.no_grad():
                residual = w - binary_factors(w, config).compose(config.group_size)
                u, v = lowrank_residual(residual, config.rank)
            self.lowrank_u, self.lowrank_v = nn.Parameter(u), nn.Parameter(v)

    def quantized_weight(self) -> torch.Tensor:
        lowrank = None if self.lowrank_u is None else (self.lowrank_u, self.lowrank_v)
        return fake_quantize(self.weight, self.config, lowrank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_inference(self) -> BitLinear:
        packed = binarize(self.weight, BinarizeConfig(self.config.scheme, self.config.group_size, 0))
        if self.lowrank_u is not None:
            packed = PackedWeight(
                **{**packed.tensors(), "lowrank_u": self.lowrank_u.to(LOWRANK_DTYPE), "lowrank_v": self.lowrank_v.to(LOWRANK_DTYPE)},
                in_features=packed.in_features,
                group_size=packed.group_size,
            )
        return BitLinear.from_packed(packed, self.bias, self.config)


class BitConv2d(nn.Module):
    """Conv2d with a packed 1-bit kernel: im2col, then bitmatmul over [O, I*kh*kw]."""

    def __init__(self, linear: BitLinear, in_channels: int, kernel_size: tuple[int, int], stride, padding, dilation):
        super().__init__()
        self.linear = linear
        self.in_channels, self.out_channels = in_channels, linear.out_features
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, I*kh*kw, L]
        out_h = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        y = self.linear(cols.transpose(1, 2))  # [B, L, O]
        return y.transpose(1, 2).reshape(b, self.out_channels, out_h, out_w)


class BitConv2dTrain(nn.Module):
    """Training form of BitConv2d: conv2d with the fake-quantized kernel."""

    def __init__(self, conv: nn.Conv2d, config: BinarizeConfig):
        super().__init__()
        if conv.groups != 1 or isinstance(conv.padding, str):
            raise ValueError("BitConv2d supports groups=1 and numeric padding only")
        o, i, kh, kw = conv.weight.shape
        self.linear = BitLinearTrain(conv.weight.reshape(o, i * kh * kw), conv.bias, config)
        self.in_channels, self.kernel_size = i, (kh, kw)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.quantized_weight().reshape(-1, self.in_channels, *self.kernel_size)
        b = self.linear.bias
        return F.conv2d(x, w.to(x.dtype), None if b is None else b.to(x.dtype), self.stride, self.padding, self.dilation)

    def to_inference(self) -> BitConv2d:
        return BitConv2d(self.linear.to_inference(), self.in_channels, self.kernel_size, self.stride, self.padding, self.dilation)


def binarize_linear(linear: nn.Linear, config: BinarizeConfig) -> BitLinear:
    """Post-training: nn.Linear -> BitLinear."""
    return BitLinear.from_packed(binarize(linear.weight, config), linear.bias, config)


def binarize_conv(conv: nn.Conv2d, config: BinarizeConfig) -> BitConv2d:
    """Post-training: nn.Conv2d -> BitConv2d."""
    return BitConv2dTrain(conv, config).to_inference()
