"""Use a Bonsai 1-bit model inside the matching diffusers pipeline.

A converted checkpoint loads back as the diffusers model class it came from (UNet2DConditionModel,
FluxTransformer2DModel, ...) with BitLinear / BitConv2d layers in place of the binarized ones, so
it drops into the pipeline as its `unet` or `transformer`:

    # once: bonsai quantize ./stable-diffusion-v1-5 -o sd15-1bit.safetensors
    import torch
    from diffusers import StableDiffusionPipeline
    from bonsai.diffusers import load_bonsai_unet

    unet = load_bonsai_unet("sd15-1bit.safetensors")            # SD 1.5: 1.95 bits/weight, 1.02 in 1-bit layers
    pipe = StableDiffusionPipeline.from_pretrained("./stable-diffusion-v1-5", unet=unet)
    image = pipe("a bonsai tree on a desk", num_inference_steps=25).images[0]
    image.save("bonsai.png")

    # FLUX, SD3, PixArt-Sigma, Sana: the same with the transformer
    from diffusers import FluxPipeline
    from bonsai.diffusers import load_bonsai_transformer

    transformer = load_bonsai_transformer("flux-dev-1bit.safetensors", dtype=torch.bfloat16)
    pipe = FluxPipeline.from_pretrained("./FLUX.1-dev", transformer=transformer, torch_dtype=torch.bfloat16)
    image = pipe("a bonsai tree", num_inference_steps=28, guidance_scale=3.5).images[0]

    # or let the checkpoint find its source pipeline (it records the folder it was converted from)
    from bonsai.diffusers import load_bonsai_pipeline
    pipe = load_bonsai_pipeline("sd15-1bit.safetensors")

    # with `bonsai quantize ... -o sd15-1bit/sd15-1bit.safetensors --bundle copy` the text encoder,
    # tokenizer, VAE and scheduler are copied beside it: that folder alone generates
    pipe = load_bonsai_pipeline("sd15-1bit")
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .convert.adapters import ADAPTERS, PREFIX, UnsupportedModel
from .convert.bundle import bundled_checkpoint, check_parts
from .format import CheckpointError, read_header
from .models import load_model


def load_bonsai_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A converted checkpoint as its diffusers model class (eval mode, 1-bit layers packed)."""
    architecture = read_header(path).metadata["architecture"]
    if not architecture.startswith(PREFIX) or architecture.removeprefix(PREFIX) not in ADAPTERS:
        raise UnsupportedModel(f"{path}: architecture {architecture!r} is not a converted diffusers model")
    model, _ = load_model(path, device=device, dtype=dtype)
    return model


def _load_kind(path: str | os.PathLike[str], subfolder: str, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    class_name = read_header(path).metadata["architecture"].removeprefix(PREFIX)
    if class_name in ADAPTERS and ADAPTERS[class_name].subfolder != subfolder:
        raise UnsupportedModel(f"{path} holds a {class_name}, not a {subfolder}; use load_bonsai_model or the other loader")
    return load_bonsai_model(path, device, dtype)


def load_bonsai_unet(path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A converted UNet2DConditionModel (SD 1.x / 2.x / XL): pass it as `unet=` to the pipeline."""
    return _load_kind(path, "unet", device, dtype)


def load_bonsai_transformer(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A converted transformer (SD3, FLUX.1, PixArt-Sigma, Sana): pass it as `transformer=` to the pipeline."""
    return _load_kind(path, "transformer", device, dtype)


def load_bonsai_pipeline(
    path: str | os.PathLike[str], source: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32, **kwargs: Any
):
    """The diffusers pipeline with the 1-bit denoiser of checkpoint `path` in place (its
    high-precision layers in `dtype`). The other parts come from `source` if given, else from
    where the checkpoint says: the folder it was converted from (`bonsai quantize --bundle
    reference`), or its own folder (`--bundle copy`; `path` may then be that folder). Recorded
    parts are checked against the conversion's list first. `kwargs` go to
    DiffusionPipeline.from_pretrained (e.g. the dtype of the other components)."""
    from diffusers import DiffusionPipeline

    if os.path.isdir(path):
        path = bundled_checkpoint(path)
    pipe_meta = read_header(path).metadata.get("pipeline", {})
    if source is None:
        bundle = pipe_meta.get("bundle", "reference" if pipe_meta.get("diffusers_source") else "none")
        if bundle == "none":
            raise CheckpointError(
                "the checkpoint records no diffusers pipeline folder", os.fspath(path), "pass source= a diffusers pipeline folder"
            )
        source = os.path.dirname(os.path.abspath(path)) if bundle == "copy" else pipe_meta["diffusers_source"]
        if bundle == "reference" and not os.path.isdir(source):
            raise CheckpointError(
                f"diffusers pipeline folder {source} is missing", os.fspath(path),
                "pass source= where it is now, or convert with --bundle copy",
            )
        check_parts(source, pipe_meta.get("parts", {}), path)
    model = load_bonsai_model(path, dtype=dtype)
    # the model's own class says where it goes: a checkpoint without "pipeline" metadata (a student
    # distilled from a bare component folder) is still a transformer, and diffusers ignores a component
    # passed under the wrong name
    subfolder = ADAPTERS[read_header(path).metadata["architecture"].removeprefix(PREFIX)].subfolder
    return DiffusionPipeline.from_pretrained(source, **{subfolder: model}, **kwargs)
