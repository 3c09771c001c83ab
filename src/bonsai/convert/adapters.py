"""One adapter per supported diffusers denoiser: which class builds it, where it lives in a
pipeline folder, and which of its layers are too sensitive to binarize.

Importing this module registers every adapter's architecture ("diffusers:<ClassName>") with
bonsai.models.registry, so `load_model` can rebuild a converted model from its config.

Keep patterns are fnmatch patterns on module names. They keep the layers that are small but
steer everything else in high precision: patch/latent in and out projections, timestep and
text-time embeddings, adaLN / norm modulation, caption and context embedders, final layers.
Patterns are anchored on purpose (e.g. FLUX keeps the top-level "proj_out" but binarizes the
large "single_transformer_blocks.*.proj_out").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..models.registry import register_architecture

PREFIX = "diffusers:"


@dataclass(frozen=True)
class Adapter:
    class_name: str  # diffusers model class, e.g. "UNet2DConditionModel"
    subfolder: str  # its folder inside a diffusers pipeline folder
    keep: tuple[str, ...]  # module-name patterns that stay high precision
    pipelines: tuple[str, ...]  # diffusers pipelines it plugs into (first: the default)
    description: str

    @property
    def architecture(self) -> str:
        return PREFIX + self.class_name

    def model_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.class_name)

    def build(self, config: dict) -> nn.Module:
        """The model from its config with parameters on the meta device and real buffers
        (some diffusers models compute non-persistent buffers, e.g. sin-cos position tables, at init)."""
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        with torch.device("cpu"), parameters_on_meta():
            return self.model_class().from_config(cfg)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter registered on a module is moved to the meta device at
    once (its initialisation then costs nothing); buffers stay where they are created."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


_UNET_KEEP = (
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding.*",
    "add_embedding.*",
    "class_embedding*",
    "encoder_hid_proj*",
    "*time_emb_proj",
    "*.proj_in",
    "*.proj_out",
    "*norm*",
)

ADAPTERS: dict[str, Adapter] = {
    a.class_name: a
    for a in (
        Adapter(
            "UNet2DConditionModel",
            "unet",
            _UNET_KEEP,
            ("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
            "Stable Diffusion 1.x / 2.x / XL UNet",
        ),
        Adapter(
            "SD3Transformer2DModel",
            "transformer",
            ("pos_embed.*", "time_text_embed.*", "context_embedder", "*norm*", "proj_out"),
            ("StableDiffusion3Pipeline",),
            "Stable Diffusion 3 / 3.5 MMDiT",
        ),
        Adapter(
            "FluxTransformer2DModel",
            "transformer",
            ("x_embedder", "context_embedder", "time_text_embed.*", "*norm*", "proj_out"),
            ("FluxPipeline",),
            "FLUX.1 transformer",
        ),
        Adapter(
            "PixArtTransformer2DModel",
            "transformer",
            ("pos_embed.*", "adaln_single.*", "caption_projection.*", "*norm*", "proj_out"),
            ("PixArtSigmaPipeline", "PixArtAlphaPipeline"),
            "PixArt-Sigma / PixArt-Alpha transformer",
        ),
        Adapter(
            "SanaTransformer2DModel",
            "transformer",
            ("patch_embed.*", "time_embed.*", "caption_projection.*", "caption_norm", "*norm*", "proj_out"),
            ("SanaPipeline",),
            "Sana linear-attention transformer",
        ),
    )
}


class UnsupportedModel(ValueError):
    """A source whose model class has no adapter."""


def adapter_for(class_name: str, where: str = "") -> Adapter:
    """The adapter for a diffusers class name (or a "diffusers:<ClassName>" architecture)."""
    name = class_name.removeprefix(PREFIX)
    try:
        return ADAPTERS[name]
    except KeyError:
        at = f"{where}: " if where else ""
        what = f"model class {name!r} is" if name else "its config names no diffusers model class (_class_name), so it is"
        raise UnsupportedModel(f"{at}{what} not supported; Bonsai converts {', '.join(sorted(ADAPTERS))}") from None


for _adapter in ADAPTERS.values():
    register_architecture(_adapter.architecture, _adapter.build)
