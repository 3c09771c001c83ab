"""`quantize_model`: a diffusers source -> a Bonsai checkpoint file, with its provenance."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..format import CheckpointError
from ..models import save_model
from ..quant import QuantPolicy
from .bundle import BUNDLE_MODES, finish_copy, pipeline_metadata, prepare_copy
from .source import SourceError, open_source
from .stream import ConversionStats, policy_for, quantize_source


def quantize_model(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    policy: QuantPolicy = QuantPolicy(keep=()),
    config: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    bundle: str = "reference",
) -> ConversionStats:
    """Binarize the denoiser of `src` (see bonsai.convert.source) and write it to `out`.

    `policy.keep` adds patterns to the adapter's own keep list. `bundle` (see bonsai.convert.bundle)
    says what the checkpoint's "pipeline" metadata does with the source pipeline's other parts (text
    encoders, VAE, scheduler): "reference" its folder, "copy" them beside `out`, "none" neither."""
    if bundle not in BUNDLE_MODES:
        raise ValueError(f"bundle {bundle!r} is not one of {', '.join(BUNDLE_MODES)}")
    out = Path(out)
    made = _missing_folders(out.parent)
    try:  # now, not after the conversion: a missing folder is made, one that cannot be fails at once
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the output folder ({e.strerror})", out.parent, "pick another -o") from None
    try:
        return _convert(src, out, policy, config, dtype, progress, bundle)
    except BaseException:  # a failed conversion leaves no empty folders behind
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # something was written there after all, or it is gone
                break
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _convert(src: str | os.PathLike[str], out: Path, policy: QuantPolicy, config: str | os.PathLike[str] | None,
             dtype: torch.dtype, progress: bool, bundle: str) -> ConversionStats:
    source = open_source(src, config)
    read = {f.resolve() for f, _ in source.keys.values()} | ({source.path.resolve()} if source.path.is_file() else set())
    if out.resolve() in read:  # the conversion reads it while the new file replaces it: the user's model would be gone
        raise SourceError(f"{out} is a weights file of the model being converted: write the 1-bit checkpoint elsewhere (-o)")
    adapter = source.adapter
    pipeline_dir = None if source.pipeline_dir is None else Path(source.pipeline_dir).resolve()
    if bundle == "copy" and pipeline_dir is None:
        raise SourceError(
            f"{src}: --bundle copy needs a diffusers pipeline folder (model_index.json) to copy the text encoders and VAE "
            "from: pass one as SRC, or as --config for a single file"
        )
    pipeline = pipeline_metadata(adapter, pipeline_dir, bundle)
    parts = list(pipeline["parts"])
    model, stats = quantize_source(source, policy, dtype, progress)
    provenance = {
        "source": str(Path(src).resolve()),
        "method": "post-training binarization",
        "binarize": policy.binarize.to_dict(),
        "keep": list(policy_for(adapter, policy).keep),
    }
    staging = prepare_copy(pipeline_dir, parts, out) if bundle == "copy" else None
    try:
        save_model(
            model, out, adapter.architecture, {k: v for k, v in source.config.items() if not k.startswith("_")},
            high_precision_dtype=dtype, pipeline=pipeline, provenance=provenance,
            description=f"1-bit {adapter.description} converted by bonsai quantize",
        )
        if staging is not None:
            finish_copy(staging, pipeline_dir, parts, out)
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return stats
