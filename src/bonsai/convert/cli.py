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
@click.option("--bundle", type=click.Choice(["reference", "copy", "none"]), default="reference", show_default=True,
              help="The source pipeline's text encoders, VAE and scheduler: reference its folder, copy them beside the "
                   "output (a folder that generates on its own), or record nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def quantize(src, out, scheme, group_size, rank, keep, min_params, config, dtype, bundle, quiet) -> None:
    """Binarize the denoiser of SRC (diffusers folder or single-file .safetensors) into a Bonsai checkpoint.

    The other parts of a pipeline (text encoders, tokenizers, VAE, scheduler) come from SRC's pipeline
    folder (or --config's): by default the checkpoint references that folder; with --bundle copy they
    are copied unchanged beside OUTPUT, so OUTPUT's folder holds everything needed to generate:

    \b
        bonsai quantize ./stable-diffusion-v1-5 -o sd15-1bit/sd15-1bit.safetensors --bundle copy
    """
    import torch

    from ..format import CheckpointError, read_header, summarize
    from ..quant import BinarizeConfig, QuantPolicy
    from .adapters import UnsupportedModel
    from .convert import quantize_model
    from .source import SourceError

    try:
        policy = QuantPolicy(BinarizeConfig(scheme, group_size, rank), keep=tuple(keep), min_params=min_params)
        stats = quantize_model(src, out, policy, config, getattr(torch, _DTYPES[dtype]), progress=not quiet, bundle=bundle)
    except (SourceError, UnsupportedModel, CheckpointError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    s = summarize(out)
    pipe = read_header(out).metadata["pipeline"]
    click.echo(f"wrote {out}")
    click.echo(f"  1-bit layers      {stats.layers_1bit} ({stats.parameters_1bit / stats.parameters:.1%} of {stats.parameters:,} weights)")
    click.echo(f"  size before       {_mib(stats.source_bytes)} (source files), {_mib(stats.fp16_bytes)} in fp16")
    click.echo(f"  size after        {_mib(s['file_bytes'])} ({stats.fp16_bytes / s['file_bytes']:.1f}x smaller than fp16)")
    click.echo(f"  bits per weight   {s['bits_per_weight']:.2f} overall, {s['bits_per_weight_1bit']:.2f} in 1-bit layers")
    click.echo(f"  peak memory (RSS) {_mib(stats.peak_rss_bytes)}")
    parts = ", ".join(pipe["parts"])
    if pipe["bundle"] == "copy":
        copied = sum(f["bytes"] for files in pipe["parts"].values() for f in files.values())
        click.echo(f"  pipeline parts    copied beside it: {parts} ({_mib(copied)}, unchanged)")
    elif pipe["bundle"] == "reference":
        click.echo(f"  pipeline parts    referenced in {pipe['diffusers_source']}: {parts}")
    else:
        click.echo("  pipeline parts    none recorded (pass a diffusers pipeline folder when loading)")
