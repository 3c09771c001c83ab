"""`bonsai distill`: train a 1-bit student against its full-precision teacher.

Teacher: a Bonsai float checkpoint (e.g. a DiT) or a diffusers folder (UNet, SD3, PixArt, Sana).
Data, per step and rank:
- data-free (default): x0 ~ N(0, I) latents of the model's shape; text = encoded prompts from
  --prompts (Bonsai DiTs, MiniLM) or, for diffusers models (whose text encoders live in their
  pipeline), random N(0, I) text states of the model's width;
- --images DIR: pixel-space DiTs learn on real images (x0 = the images in [-1, 1]).
Timesteps: logit-normal t in (0, 1) (train/flow.py); loss: MSE(student, teacher) on the same
x_t, t, text (train/distill.py). The student is the straight-through (BitLinearTrain) form.
Resumable (OUT/state.pt); one GPU, or several with `torchrun --nproc_per_node N -m bonsai.cli distill ...`
(DDP; gloo on CPU). Writes OUT/log.jsonl and, at the end, OUT/student.safetensors (packed).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import click


def _init_distributed():
    import torch
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _load_teacher(path: Path):
    """(teacher with the (x, t, text, mask) signature, architecture, config, keep patterns, text
    width, metadata the student inherits: how to generate with it, its license)."""
    import torch

    from ..quant import DEFAULT_KEEP
    from .denoisers import DiffusersDenoiser

    if path.is_dir():
        from ..convert import open_source

        source = open_source(path)
        model = source.adapter.model_class().from_pretrained(os.fspath(source.path), torch_dtype=torch.float32)
        denoiser = DiffusersDenoiser(model)
        keep = tuple(f"model.{p}" for p in source.adapter.keep)
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        return denoiser, source.adapter.architecture, config, keep, denoiser.text_dim(), {}
    from ..models import load_model

    model, meta = load_model(path)
    inherited = {k: meta[k] for k in ("pipeline", "license") if k in meta}
    return model.train(), meta["architecture"], meta["config"], DEFAULT_KEEP, meta["config"].get("text_dim", 384), inherited


def _encode_prompts(prompts, text_encoder, device):
    """Token states (float32) and masks of every prompt, encoded once, kept on `device`."""
    from ..text import TextEncoder

    encoder = TextEncoder(text_encoder).to(device) if text_encoder else TextEncoder()
    states, mask = encoder.encode(prompts)
    return states.float().to(device), mask.to(device)


def _batches(shape, text_dim, batch, encoded, images, device, seed):
    """Endless (x0, text, mask) batches; each rank draws its own. `encoded`: (states, mask) of
    the prompts, or None for random text states."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pixels = None
    if images:
        from .images import image_files, load_pixels

        try:
            pixels = load_pixels(image_files(images), shape[2], shape[1]).to(device)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    rng = random.Random(seed)
    while True:
        if pixels is not None:
            x0 = pixels[[rng.randrange(len(pixels)) for _ in range(batch)]]
        else:
            x0 = torch.randn(batch, *shape, generator=gen)
        if encoded is not None:
            idx = [rng.randrange(len(encoded[0])) for _ in range(batch)]
            text, mask = encoded[0][idx], encoded[1][idx]
        else:
            text, mask = torch.randn(batch, 8, text_dim, generator=gen), torch.ones(batch, 8, dtype=torch.bool)
        yield x0.to(device), text.to(device), mask.to(device)


@click.command()
@click.argument("teacher", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder (resumable).")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Prompts, one per line (Bonsai DiTs).")
@click.option("--text-encoder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="MiniLM folder for --prompts (e.g. an int8 export); default: the installed one.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Image folder (pixel-space DiTs).")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--batch", type=int, default=8, show_default=True, help="Per-process batch size.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--scheme", type=click.Choice(["xnor", "mean", "onebit"]), default="mean", show_default=True)
@click.option("--group-size", type=int, default=0, show_default=True)
@click.option("--rank", "lowrank", type=int, default=0, show_default=True)
@click.option("--log-every", type=int, default=50, show_default=True)
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True, help="torch.compile the student's forward on CUDA.")
def distill(teacher, out, prompts, text_encoder, images, steps, batch, lr, scheme, group_size, lowrank, log_every, checkpoint_every, seed, compile_) -> None:
    """Distill a 1-bit student from the full-precision TEACHER (Bonsai float checkpoint or diffusers folder)."""
    import torch

    from ..models import save_model
    from ..quant import BinarizeConfig, QuantPolicy, to_inference_
    from .distill import distill_loss, evaluate_loss, make_student
    from .loop import TrainConfig, rank, train, world_size

    device = _init_distributed()
    torch.manual_seed(seed)  # same initial student on every rank
    try:
        model, architecture, config, keep, text_dim, inherited = _load_teacher(teacher)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    lines = [p.strip() for p in prompts.read_text().splitlines() if p.strip()] if prompts else None
    encoded = _encode_prompts(lines, text_encoder, device) if lines else None
    channels = config.get("in_channels", 3)
    size = config.get("sample_size", 64)
    model = model.to(device)
    student = make_student(model, QuantPolicy(BinarizeConfig(scheme, group_size, lowrank), keep=keep)).to(device)
    loss_fn = distill_loss(model)
    probe = [b for b, _ in zip(_batches((channels, size, size), text_dim, batch, encoded, images, device, seed + 10_000), range(2))]
    before = evaluate_loss(loss_fn, student, probe)
    cfg = TrainConfig(steps=steps, lr=lr, warmup=min(100, steps // 10), log_every=log_every, checkpoint_every=checkpoint_every, compile=compile_)
    batches = _batches((channels, size, size), text_dim, batch, encoded, images, device, seed + rank())
    start = time.perf_counter()
    done = train(student, loss_fn, batches, cfg, out).step
    seconds = time.perf_counter() - start
    if rank() == 0:
        after = evaluate_loss(loss_fn, student, probe)
        click.echo(f"student-teacher loss on fixed probe batches: {before:.6f} before, {after:.6f} after")
        click.echo(f"{done} steps x {batch} samples x {world_size()} process(es) in {seconds:.1f} s (incl. start-up and compile)")
        inner = student.model if hasattr(student, "model") and architecture.startswith("diffusers:") else student
        to_inference_(inner)
        save_model(inner, out / "student.safetensors", architecture, config,
                   provenance={"teacher": str(teacher.resolve()), "method": "distillation", "steps": done}, **inherited)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
