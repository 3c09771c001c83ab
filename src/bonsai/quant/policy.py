"""Which layers become 1-bit, and the one verb that does it: `quantize_(model, policy)`.

Linear (and Conv2d) layers are binarized unless their name matches a keep pattern or they are
too small to matter; embeddings, norms and everything else stay in high precision."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from .binarize import BinarizeConfig
from .layers import BitConv2d, BitConv2dTrain, BitLinear, BitLinearTrain, binarize_conv, binarize_linear

# First/last projections, timestep and modulation layers, embeddings: small and sensitive.
DEFAULT_KEEP: tuple[str, ...] = (
    "*embed*",
    "*norm*",
    "*time*",
    "*modulation*",
    "*adaLN*",
    "*adaln*",
    "*final*",
    "*proj_in",
    "*proj_out",
    "*conv_in",
    "*conv_out",
    "*text_proj*",
)


@dataclass(frozen=True)
class QuantPolicy:
    binarize: BinarizeConfig = field(default_factory=BinarizeConfig)
    keep: tuple[str, ...] = DEFAULT_KEEP  # fnmatch patterns on module names that stay high precision
    min_params: int = 1024  # layers with fewer weights stay high precision
    convs: bool = True  # binarize Conv2d (groups=1) layers too

    def wants(self, name: str, module: nn.Module) -> bool:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keep):
            return False
        if isinstance(module, nn.Linear):
            return module.weight.numel() >= self.min_params
        if isinstance(module, nn.Conv2d) and self.convs:
            return module.groups == 1 and not isinstance(module.padding, str) and module.weight.numel() >= self.min_params
        return False


def plan(model: nn.Module, policy: QuantPolicy) -> list[str]:
    """Names of the modules `policy` binarizes, in model order."""
    return [name for name, module in model.named_modules() if name and policy.wants(name, module)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_(model: nn.Module, policy: QuantPolicy = QuantPolicy(), form: Literal["inference", "train"] = "inference") -> list[str]:
    """Binarize `model` in place; returns the names of the layers replaced.

    form="inference": packed BitLinear/BitConv2d (post-training binarization);
    form="train": BitLinearTrain/BitConv2dTrain with latent float weights (for distillation)."""
    names = plan(model, policy)
    cfg = policy.binarize
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            new = binarize_linear(module, cfg) if form == "inference" else BitLinearTrain(module.weight, module.bias, cfg)
        else:
            new = binarize_conv(module, cfg) if form == "inference" else BitConv2dTrain(module, cfg)
        _replace(model, name, new)
    return names


def to_inference_(model: nn.Module) -> list[str]:
    """Convert every training-form 1-bit layer of `model` to its packed inference form, in place."""
    found = [n for n, m in model.named_modules() if isinstance(m, (BitLinearTrain, BitConv2dTrain))]
    names = [n for n in found if n.rpartition(".")[0] not in found]  # a conv's own .linear converts with it
    for name in names:
        _replace(model, name, model.get_submodule(name).to_inference())
    return names


def bit_layers(model: nn.Module) -> dict[str, BitLinear]:
    """The packed 1-bit linear layers of `model` by name (a BitConv2d's own BitLinear included)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}


__all__ = ["DEFAULT_KEEP", "QuantPolicy", "BitConv2d", "bit_layers", "plan", "quantize_", "to_inference_"]
