"""1-bit copies of diffusion models with ComfyUI's module names. Plain torch and bonsai, no ComfyUI:
which layers stay high precision, how to copy a model with some layers swapped without copying
their float weights, and how big a model is.

ComfyUI names a model's modules as the original code did (LDM for SD 1.x/2.x/XL, BFL for Flux,
...), not as diffusers does. Bonsai's conversion adapters (bonsai.convert.adapters) keep the same
layers by their diffusers names; KEEP_BY_CLASS gives those layers' ComfyUI names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from bonsai.quant import DEFAULT_KEEP, BitLinear, QuantPolicy, plan
from bonsai.quant.layers import binarize_conv, binarize_linear

# Extra keep patterns by the class name of ComfyUI's diffusion model, beyond DEFAULT_KEEP (which
# already keeps *embed*, *norm*, *time*, *modulation*, *adaLN*, *final*, *proj_in, *proj_out).
# Each line gives the diffusers name Bonsai's adapter keeps it under.
KEEP_BY_CLASS: dict[str, tuple[str, ...]] = {
    "UNetModel": (  # SD 1.x / 2.x / XL (openaimodel)
        "input_blocks.0.0",  # conv_in
        "out.*",  # conv_norm_out, conv_out
        "*.emb_layers.*",  # resnets.*.time_emb_proj
        "label_emb.*",  # add_embedding (SDXL)
    ),
    "Flux": (
        "img_in",  # x_embedder
        "txt_in",  # context_embedder
        "vector_in.*",  # time_text_embed.text_embedder
        "guidance_in.*",  # time_text_embed.guidance_embedder
        "*_mod.lin",  # transformer_blocks.*.norm1(.context).linear
    ),
    "Chroma": ("img_in", "txt_in", "distilled_guidance_layer.*"),
    "PixArtMS": ("t_block.*",),  # adaln_single.linear
}


def keep_patterns(class_name: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Module-name patterns that stay high precision in a ComfyUI diffusion model of `class_name`."""
    return DEFAULT_KEEP + KEEP_BY_CLASS.get(class_name, ()) + tuple(extra)


def binarized_layers(model: nn.Module, policy: QuantPolicy) -> dict[str, nn.Module]:
    """Packed 1-bit versions (BitLinear / BitConv2d) of the layers of `model` that `policy` binarizes,
    by module name; `model` itself is not changed."""
    out: dict[str, nn.Module] = {}
    for name in plan(model, policy):
        layer = model.get_submodule(name)
        out[name] = binarize_linear(layer, policy.binarize) if isinstance(layer, nn.Linear) else binarize_conv(layer, policy.binarize)
    return out


def copy_with(model: nn.Module, swaps: dict[int, Any]) -> nn.Module:
    """A deep copy of `model` in which every object whose id is a key of `swaps` is replaced by its
    value (and not copied). Swapping the layers being binarized means their float weights are never
    copied; swapping an object for None drops a back-reference that must not be copied.

    Plain attributes of `model` whose class answers any attribute (ComfyUI's model config, held
    as BaseModel.model_config, returns None for a missing name since ComfyUI 0.4) are copied
    attribute by attribute: copy.deepcopy would take that None for their __setstate__ and call it."""
    memo = dict(swaps)
    for value in vars(model).values():
        if id(value) not in memo and not isinstance(value, nn.Module) and _answers_any_attribute(value):
            memo[id(value)] = _attribute_copy(value, memo)
    return copy.deepcopy(model, memo)


def _answers_any_attribute(obj: Any) -> bool:
    # Looked up on the class, so the instance's __getattr__ (and its warning) is not triggered.
    cls = type(obj)
    return hasattr(cls, "__getattr__") and hasattr(obj, "__dict__") and not hasattr(cls, "__deepcopy__")


def _attribute_copy(obj: Any, memo: dict[int, Any]) -> Any:
    """A new instance of obj's class with deep copies of its attributes, made without __init__."""
    out = object.__new__(type(obj))
    memo[id(obj)] = out  # an attribute that refers back to obj gets the copy
    out.__dict__.update(copy.deepcopy(obj.__dict__, memo))
    return out


def swaps_for(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[int, nn.Module]:
    """copy_with's swaps that put `replacements` (module name -> new module) in place in a copy of `model`."""
    return {id(model.get_submodule(name)): new for name, new in replacements.items()}


@dataclass(frozen=True)
class ModelSize:
    """Weights of a model: how many (a 1-bit [N, K] layer counts N*K) and the bytes they take."""

    weights: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(self.weights, 1)


def model_size(model: nn.Module, only_bit_layers: bool = False) -> ModelSize:
    """Weight count and storage of `model` (parameters and the packed buffers of its 1-bit layers;
    with only_bit_layers, of its BitLinear layers alone)."""
    weights = stored = 0
    for module in model.modules():
        if isinstance(module, BitLinear):
            weights += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
            stored += sum(t.numel() * t.element_size() for t in module.state_dict().values())
        elif not only_bit_layers:
            for p in module.parameters(recurse=False):
                weights += p.numel()
                stored += p.numel() * p.element_size()
    return ModelSize(weights, stored)


def size_report(before: ModelSize, after: ModelSize, bits: ModelSize, layers: int) -> str:
    """One line: layers binarized, bits per weight of the 1-bit layers and of the whole model, size."""
    mib = 1024 * 1024
    return (
        f"{layers} layers to 1 bit ({bits.weights / max(before.weights, 1):.1%} of the weights, "
        f"{bits.bits_per_weight:.2f} bits/weight with scales); diffusion model {before.bytes / mib:.1f} MiB "
        f"({before.bits_per_weight:.2f} bits/weight) -> {after.bytes / mib:.1f} MiB ({after.bits_per_weight:.2f} bits/weight)"
    )
