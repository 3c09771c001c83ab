"""`quantize_model`: a diffusers source -> a Bonsai checkpoint file, with its provenance."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models import save_model
from ..quant import QuantPolicy
from .source import open_source
from .stream import ConversionStats, policy_for, quantize_source


def quantize_model(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    policy: QuantPolicy = QuantPolicy(keep=()),
    config: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> ConversionStats:
    """Binarize the denoiser of `src` (see bonsai.convert.source) and write it to `out`.

    `policy.keep` adds patterns to the adapter's own keep list. The checkpoint's "pipeline" metadata references the unchanged text encoders, VAE and
    scheduler of the source pipeline folder ("diffusers_source"), when there is one."""
    source = open_source(src, config)
    model, stats = quantize_source(source, policy, dtype, progress)
    adapter = source.adapter
    pipeline = {
        "text_encoder": "diffusers",
        "diffusers_class": adapter.class_name,
        "diffusers_subfolder": adapter.subfolder,
        "diffusers_pipelines": list(adapter.pipelines),
        "diffusers_source": None if source.pipeline_dir is None else str(Path(source.pipeline_dir).resolve()),
    }
    provenance = {
        "source": str(Path(src).resolve()),
        "method": "post-training binarization",
        "binarize": policy.binarize.to_dict(),
        "keep": list(policy_for(adapter, policy).keep),
    }
    save_model(
        model, out, adapter.architecture, {k: v for k, v in source.config.items() if not k.startswith("_")},
        high_precision_dtype=dtype, pipeline=pipeline, provenance=provenance,
        description=f"1-bit {adapter.description} converted by bonsai quantize",
    )
    return stats
