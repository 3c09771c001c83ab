"""`bonsai generate`: prompt -> PNG files."""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import click

from .cli_paths import writable_dir
from .limits import CFG_RANGE, HIRES_STRENGTH, IMG2IMG_STRENGTH, MAX_BATCH, MAX_SEED, MAX_STEPS

SIZE = re.compile(r"^(\d+)x(\d+)$")


def _open_image(path: Path):
    """The image at `path`, read whole now (a file that is not one fails before the model loads), turned
    upright as its EXIF orientation says (phone photos)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
        raise click.BadParameter(f"{path} is not an image Bonsai can read ({e})", param_hint="--init") from None


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    m = SIZE.match(value.strip().lower())
    if not m:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 64x64")
    return int(m.group(1)), int(m.group(2))


@click.command()
@click.argument("prompt")
@click.option("--negative", "negative_prompt", default="", help="What the image should not show.")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=None, help="Sampling steps (default: the model's).")
@click.option("--cfg", type=click.FloatRange(*CFG_RANGE), default=None, help="Classifier-free guidance scale (default: the model's).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None, help="Seed of the first image; image i uses seed + i. Random if unset.")
@click.option("--size", callback=_size, default=None, metavar="WxH", help="Image size, e.g. 64x64 (default: the model's).")
@click.option("--batch", type=click.IntRange(1, MAX_BATCH), default=1, show_default=True, help="Images to generate.")
@click.option("--sampler", type=click.Choice(["euler", "heun", "dpmpp_2m"]), default=None, help="Sampler (default: the model's).")
@click.option("--model", default="bonsai-emoji", show_default=True, help="Model name (see `bonsai models list`) or checkpoint path.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="Where to generate (auto: CUDA, else Apple MPS, else CPU).")
@click.option("--memory", type=click.Choice(["normal", "lean", "offload"]), default="normal", show_default=True,
              help="lean: one model part on the device at a time, tiled decoding; offload: lean plus denoiser blocks one at a time.")
@click.option("--cuda-graph/--no-cuda-graph", "cuda_graph", default=None,
              help="Replay the denoiser from CUDA graphs (default: on for CUDA with --memory normal or lean; BONSAI_CUDA_GRAPH=0/1 overrides the default).")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs"), show_default=True,
              help="Folder for the PNGs (made if missing), named NNNNN-SEED.png after the highest number there.")
@click.option("--lora-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of NAME.safetensors LoRAs for <lora:NAME:weight> tags in the prompt.")
@click.option("--init", "init_image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Image to start from (img2img), resized to the output size.")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=None,
              help=f"With --init: how much of it to redraw, from a little (0.1) to all (1).  [default: {IMG2IMG_STRENGTH:g}]")
@click.option("--hires", "hires_scale", type=click.FloatRange(1, 4, min_open=True), default=None, metavar="SCALE",
              help="Second pass: upscale the images by SCALE, then refine them with img2img (hires fix).")
@click.option("--hires-strength", type=click.FloatRange(0, 1, min_open=True), default=None,
              help=f"With --hires: how much the second pass redraws.  [default: {HIRES_STRENGTH:g}]")
@click.option("--hires-steps", type=click.IntRange(1, MAX_STEPS), default=None,
              help="With --hires: the second pass's steps (default: the first pass's).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def generate(prompt, negative_prompt, steps, cfg, seed, size, batch, sampler, model, device, memory, cuda_graph, output,
             lora_dir, init_image, strength, hires_scale, hires_strength, hires_steps, quiet) -> None:
    """Generate images for PROMPT and write them as PNGs (with their parameters embedded)."""
    from tqdm import tqdm

    from .format import CheckpointError
    from .hires import generate_hires
    from .hub import ModelNotFound
    from .images import save_numbered
    from .pipeline import GenerationWarning, InvalidRequest, Pipeline

    if not prompt.strip():
        raise click.BadParameter("the prompt is empty: describe the image you want", param_hint="PROMPT")
    if strength is not None and init_image is None:
        raise click.BadParameter("applies to img2img only: give --init IMAGE too", param_hint="--strength")
    for name, value in (("--hires-strength", hires_strength), ("--hires-steps", hires_steps)):
        if value is not None and hires_scale is None:
            raise click.BadParameter("applies to the second pass only: give --hires SCALE too", param_hint=name)
    init = _open_image(init_image) if init_image is not None else None
    out_dir = writable_dir(output)
    start = time.perf_counter()
    try:
        pipe = Pipeline.from_pretrained(model, device=device, memory=memory, cuda_graph=cuda_graph)
        pipe.lora_dir = None if lora_dir is None else str(lora_dir)
        width, height = size if size else (None, None)
        bars: dict[int, tqdm] = {}

        def progress(stage: int, stages: int, step: int, total: int, _x0) -> None:
            if stage not in bars:  # made at a pass's first step, so a rejected request prints only its error
                for bar in bars.values():
                    bar.close()
                desc = "denoising" if stages == 1 else f"pass {stage}/{stages}"
                bars[stage] = tqdm(total=total, desc=desc, unit="step", disable=quiet)
            bars[stage].update(step - bars[stage].n)

        first = dict(negative_prompt=negative_prompt, steps=steps, cfg=cfg, seed=seed, width=width, height=height,
                     sampler=sampler, init_images=None if init is None else [init],
                     strength=None if init is None else (strength or IMG2IMG_STRENGTH))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore", GenerationWarning)  # printed below from the result, once each
            if hires_scale is None:
                result = pipe.generate(prompt, batch=batch, callback=lambda s, t, x0: progress(1, 1, s, t, x0), **first)
            else:
                result = generate_hires(pipe, prompt, scale=hires_scale, hires_strength=hires_strength or HIRES_STRENGTH,
                                        hires_steps=hires_steps, batch=batch, callback=progress, **first)
        for bar in bars.values():
            bar.close()
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        for message in result.warnings:  # after the bars, one plain line each
            click.echo(f"warning: {message}", err=True)
    except (InvalidRequest, CheckpointError, ModelNotFound) as e:
        raise click.ClickException(str(e)) from None
    paths = save_numbered(result.images, [p.seed for p in result.params], out_dir)
    for path in paths:
        click.echo(str(path))
    if not quiet:
        click.echo(f"{len(paths)} image(s) in {time.perf_counter() - start:.1f} s on {pipe.device}", err=True)
