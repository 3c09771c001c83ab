"""`bonsai quantize`: a diffusers model or single-file checkpoint -> a 1-bit Bonsai checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .safetensors file.")
@click.option("--scheme", type=click.Choice(["xnor", "mean", "onebit"]), default="mean", show_default=True, help="Binarization scheme.")
@click.option("--group-size", type=int, default=0, show_default=True, help="One scale per this many input columns (0: per row).")
@click.option("--rank", type=int, default=0, show_default=True, help="Rank of the bf16 low-rank residual (0: none).")
@click.option("--keep", multiple=True, metavar="PATTERN", help="Extra module-name pattern to keep in high precision (repeatable).")
@click.option("--min-params", type=int, default=1024, show_default=True, help="Layers with fewer weights stay high precision.")
@click.option("--config", "config", type=click.Path(exists=True, path_type=Path), default=None,
              help="For a single-file checkpoint: a diffusers folder or config.json of the same model.")
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), default="bf16", show_default=True, help="dtype of the high-precision layers.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def quantize(src, out, scheme, group_size, rank, keep, min_params, config, dtype, quiet) -> None:
    """Binarize the denoiser of SRC (diffusers folder or single-file .safetensors) into a Bonsai checkpoint.

    Text encoders, VAE and scheduler are not copied: the checkpoint references SRC's pipeline folder."""
    import torch

    from ..format import CheckpointError, summarize
    from ..quant import BinarizeConfig, QuantPolicy
    from .adapters import UnsupportedModel
    from .convert import quantize_model
    from .source import SourceError

    try:
        policy = QuantPolicy(BinarizeConfig(scheme, group_size, rank), keep=tuple(keep), min_params=min_params)
        stats = quantize_model(src, out, policy, config, getattr(torch, _DTYPES[dtype]), progress=not quiet)
    except (SourceError, UnsupportedModel, CheckpointError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    s = summarize(out)
    click.echo(f"wrote {out}")
    click.echo(f"  1-bit layers      {stats.layers_1bit} ({stats.parameters_1bit / stats.parameters:.1%} of {stats.parameters:,} weights)")
    click.echo(f"  size before       {_mib(stats.source_bytes)} (source files), {_mib(stats.fp16_bytes)} in fp16")
    click.echo(f"  size after        {_mib(s['file_bytes'])} ({stats.fp16_bytes / s['file_bytes']:.1f}x smaller than fp16)")
    click.echo(f"  bits per weight   {s['bits_per_weight']:.2f} overall, {s['bits_per_weight_1bit']:.2f} in 1-bit layers")
    click.echo(f"  peak memory (RSS) {_mib(stats.peak_rss_bytes)}")
