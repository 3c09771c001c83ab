"""`bonsai train-lora`: train a LoRA on a 1-bit model (QLoRA-style; see bonsai.train.lora)."""

from __future__ import annotations

from pathlib import Path

import click

from .images import __doc__ as IMAGES_LAYOUT


@click.command("train-lora", epilog="\b\n" + IMAGES_LAYOUT.split("\n\n", 1)[1])
@click.argument("base")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="LoRA file to write (.safetensors, PEFT layout).")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="Folder of captioned images (layout below).")
@click.option("--data", "bundle", type=click.Path(path_type=Path), default=None, help="Bonsai dataset bundle (`bonsai data emoji`).")
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank: the inner size of each layer's A, B pair.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1).")
@click.option("--steps", type=click.IntRange(min=1), default=500, show_default=True, help="Training steps in all; a resumed run continues up to this count.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak AdamW learning rate: warmup over min(50, steps/10) steps, then cosine decay to 10%.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Images per step.")
@click.option("--targets", multiple=True, default=("blocks.*",), show_default=True, help="fnmatch pattern of layers that get a LoRA (repeatable).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Resumable state and log.jsonl (default: OUTPUT without .safetensors, plus .run).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to train (auto: CUDA, else Apple MPS, else CPU).")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Print and append to the run folder's log.jsonl the loss, gradient norm, lr and speed every N steps (and at the end).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Save the resumable state in the run folder every N steps (and at the end).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the LoRA's start, the timesteps and noise, the batches and which captions are dropped.")
def train_lora_cmd(base, output, images, bundle, rank, alpha, steps, lr, batch, targets, run_dir, device, log_every, checkpoint_every, seed) -> None:
    """Train a LoRA for the 1-bit model BASE (catalog name or checkpoint) on captioned images.

    The base stays packed; only the LoRA trains. The result loads with apply_lora, the ComfyUI
    LoRA node, or `<lora:NAME:0.8>` in a prompt (with --lora-dir)."""
    from ..format import CheckpointError
    from ..hub import ModelNotFound
    from ..lora import save_lora
    from ..pipeline import InvalidRequest, Pipeline
    from .images import captioned_images
    from .loop import TrainConfig
    from .lora import LoRAConfig, bundle_data, folder_data, train_lora

    if (images is None) == (bundle is None):
        raise click.UsageError("give exactly one of --images DIR or --data BUNDLE")
    if output.suffix != ".safetensors":
        raise click.UsageError(f"--output {output} must end in .safetensors")
    name = output.stem.replace(".", "_")
    try:
        captioned = captioned_images(images) if images is not None else None  # a bad folder fails before loading
        pipe = Pipeline.from_pretrained(base, device=device)
        if pipe.decoder is not None:
            raise InvalidRequest(f"{base}: LoRA training needs a pixel-space model (this one's VAE has no encoder)")
        size = (pipe.defaults.width, pipe.defaults.height)
        if images is not None:
            data = folder_data(pipe.text_encoder, *captioned, *size)
        else:
            minilm = pipe.metadata.get("pipeline", {}).get("text_encoder", "minilm") == "minilm"
            data = bundle_data(pipe.text_encoder, bundle, *size, minilm=minilm)
        cfg = LoRAConfig(rank=rank, alpha=alpha, targets=tuple(targets), batch=batch, seed=seed)
        train_cfg = TrainConfig(steps=steps, lr=lr, warmup=min(50, steps // 10), log_every=log_every, checkpoint_every=checkpoint_every)
        empty = pipe.text_encoder.encode([""])
        before, after = train_lora(pipe.denoiser, name, data, empty, cfg, train_cfg, run_dir or output.with_suffix(".run"))
        save_lora(pipe.denoiser, name, output)
    except (ValueError, OSError, CheckpointError, ModelNotFound) as e:  # LoRAError and InvalidRequest are ValueErrors
        raise click.ClickException(str(e)) from None
    click.echo(f"flow-matching loss on fixed probe batches: {before:.6f} before, {after:.6f} after")
    click.echo(f"{len(data.pixels)} images, LoRA '{name}' (rank {rank}) written to {output}")
