"""`bonsai distill`: train a 1-bit student against its full-precision teacher.

Teacher: a Bonsai float checkpoint (e.g. a DiT) or a diffusers folder (SD 1.x/2.x/XL UNet, SD3,
FLUX.1, PixArt, Sana), seen through the (x_t, t, text, mask[, pooled]) signature (denoisers.py).

Data, per step and rank:
- data-free (default): x0 ~ N(0, I) latents of the model's shape (--latent-size, default the
  model's sample_size); the text of each sample is one of the --prompts, drawn at random;
- --images DIR: pixel-space DiTs learn on real images (x0 = the images in [-1, 1]).
Text conditioning: the prompts are encoded once, before training, by the teacher's own encoder:
MiniLM for Bonsai DiTs; for a diffusers pipeline folder, its text encoder(s) through the pipeline
class's encode_prompt (token states, attention mask, pooled embedding for SDXL / SD3 / FLUX), then
the encoders are freed (prompt_encoding.py). Random N(0, I) text states are only the fallback
when the folder has no text encoder or no --prompts are given; the run says so in one line.
Timesteps: logit-normal t in (0, 1) (train/flow.py), x_t = (1 - t) x0 + t noise, mapped to each
model's timestep convention by its wrapper; DDPM-trained models (SD UNets, PixArt) get the point of
their own schedule (the folder's scheduler, else SD's) with the same signal-to-noise ratio. Loss: MSE between student and teacher outputs on the
same x_t, t and text (train/distill.py); the student is the straight-through (BitLinearTrain) form.
Sample grids: teacher row over student row on 4 fixed prompts and seeds, every --sample-every
steps and at the end, in OUT/samples/step-NNNNNN.png (samples.py): Euler on pixels for Bonsai
pixel DiTs, the folder's own pipeline (scheduler + VAE) for diffusers models with a VAE.
Resumable (OUT/state.pt; OUT/run.json records the teacher and binarization a run resumes with); one GPU, or several with `torchrun --nproc_per_node N -m bonsai.cli distill ...`
(DDP; gloo on CPU). Writes OUT/log.jsonl and, at the end, OUT/student.safetensors (packed); the student
of a diffusers pipeline folder references that folder as `bonsai quantize` does, so load_bonsai_pipeline needs no source=.
On a CPU shared with other jobs, OMP_NUM_THREADS=1 avoids intra-op thread stalls (~6-10x).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
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


@dataclass
class Teacher:
    """The teacher behind the (x, t, text, mask[, pooled]) signature and what the run needs about it."""

    model: object  # nn.Module
    architecture: str
    config: dict
    keep: tuple[str, ...]  # module patterns the student keeps in high precision
    text_dim: int
    pooled_dim: int
    inherited: dict  # metadata the student inherits: how to generate with it, its license
    pipeline_dir: Path | None = None  # diffusers pipeline folder (text encoders, VAE), if any
    component: str = ""  # the denoiser's folder name inside it ("unet", "transformer")
    vae_scale: int = 1  # pixels per latent pixel


def _vae_scale(pipeline_dir: Path | None) -> int:
    """Pixels per latent pixel, from the pipeline's VAE config (8 when unknown, as diffusers assumes)."""
    import json

    cfg = pipeline_dir / "vae" / "config.json" if pipeline_dir else None
    if cfg is None or not cfg.exists():
        return 8
    vae = json.loads(cfg.read_text())
    if vae.get("_class_name") == "AutoencoderDC":
        return 2 ** (len(vae["encoder_block_out_channels"]) - 1)
    return 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)


def _load_teacher(path: Path) -> Teacher:
    import torch

    from ..quant import DEFAULT_KEEP
    from .denoisers import VP_KINDS, DiffusersDenoiser, scheduler_alphas_cumprod

    if path.is_dir():
        from ..convert import open_source
        from ..convert.bundle import pipeline_metadata

        source = open_source(path)
        # the student references the teacher's pipeline folder as `bonsai quantize` would (checked now, before training)
        pipeline_dir = None if source.pipeline_dir is None else source.pipeline_dir.resolve()
        inherited = {} if pipeline_dir is None else {"pipeline": pipeline_metadata(source.adapter, pipeline_dir, "reference")}
        model = source.adapter.model_class().from_pretrained(os.fspath(source.path), torch_dtype=torch.float32)
        scale = _vae_scale(source.pipeline_dir)
        schedule = scheduler_alphas_cumprod(source.pipeline_dir) if type(model).__name__ in VP_KINDS else None
        denoiser = DiffusersDenoiser(model, vae_scale=scale, alphas_cumprod=schedule)
        keep = tuple(f"model.{p}" for p in source.adapter.keep)
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        return Teacher(denoiser, source.adapter.architecture, config, keep, denoiser.text_dim(), denoiser.pooled_dim(), inherited,
                       source.pipeline_dir, source.path.name, scale)
    from ..format import read_header
    from ..models import load_model

    meta = read_header(path).metadata
    if meta["quantization"]["layers"]:  # a student learns from the full-precision model, not from another 1-bit one
        provenance = meta.get("provenance", {})
        source = provenance.get("source") or provenance.get("teacher")  # what quantize / distill made it from
        hint = f": distill from {source}" if source else ": distill from the full-precision model it was made from"
        raise ValueError(f"{path} is a 1-bit model ({len(meta['quantization']['layers'])} packed layers){hint}")
    model, meta = load_model(path)
    inherited = {k: meta[k] for k in ("pipeline", "license") if k in meta}
    return Teacher(model.train(), meta["architecture"], meta["config"], DEFAULT_KEEP, meta["config"].get("text_dim", 384), 0, inherited)


def _latent_multiple(config: dict) -> tuple[int, str]:
    """The latent side a teacher of this config takes is a multiple of this (and why)."""
    if "down_block_types" in config:  # a diffusers UNet downsamples after every down block but the last
        halvings = len(config["down_block_types"]) - 1
        return 2**halvings, f"the teacher's UNet downsamples the latents by {2**halvings}"
    patch = config.get("patch_size") or 1
    return patch, f"the teacher cuts the latents into {patch}x{patch} patches"


def _conditioning(teacher: Teacher, lines: list[str] | None, text_encoder: Path | None, device):
    """The prompts' encoding by the teacher's own text encoder(s), or None (random text states),
    saying why in one line."""
    from .prompt_encoding import Conditioning, encode_prompts, text_components

    if teacher.architecture.startswith("diffusers:"):
        if teacher.pipeline_dir is None or not text_components(teacher.pipeline_dir):
            click.echo(f"{teacher.pipeline_dir or 'the teacher folder'} has no text encoder: distilling on random N(0, I) text states")
            return None
        if not lines:
            click.echo("no --prompts: distilling on random N(0, I) text states (pass --prompts to use the pipeline's text encoders)")
            return None
        return encode_prompts(teacher.pipeline_dir, lines, device)
    if not lines:
        return None
    from ..text import TextEncoder

    encoder = TextEncoder(text_encoder).to(device)  # None: the installed MiniLM
    states, mask = encoder.encode(lines)
    return Conditioning(states.float().to(device), mask.to(device))


def _random_conditioning(n: int, teacher: Teacher, gen, device):
    """n random N(0, I) text states of 8 tokens (and pooled embeddings where the model takes them)."""
    import torch

    from .prompt_encoding import Conditioning

    pooled = torch.randn(n, teacher.pooled_dim, generator=gen) if teacher.pooled_dim else None
    cond = Conditioning(torch.randn(n, 8, teacher.text_dim, generator=gen), torch.ones(n, 8, dtype=torch.bool), pooled)
    return cond.to(device)


def _load_images(images: Path | None, shape, device):
    """The --images folder as x0 [N, C, H, W] on `device`, or None (noise latents)."""
    if images is None:
        return None
    from .images import image_files, load_pixels

    try:
        return load_pixels(image_files(images), shape[2], shape[1]).to(device)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def _batches(shape, teacher: Teacher, batch, cond, pixels, device, seed):
    """Endless (x0, text, mask[, pooled]) batches; each rank draws its own. `cond`: the encoded
    prompts, or None for fresh random text states every batch; `pixels`: real x0 images, or None
    for N(0, I) latents."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    while True:
        if pixels is not None:
            x0 = pixels[[rng.randrange(len(pixels)) for _ in range(batch)]]
        else:
            x0 = torch.randn(batch, *shape, generator=gen)
        if cond is not None:
            c = cond.select([rng.randrange(len(cond)) for _ in range(batch)])
        else:
            c = _random_conditioning(batch, teacher, gen, device)
        yield (x0.to(device), c.states, c.mask) + (() if c.pooled is None else (c.pooled,))


def _sampler(teacher: Teacher, cond, shape, steps: int, device):
    """(sampler, how to reach the sampled module inside teacher/student) for the grids, or None."""
    import torch

    from .samples import SampleSpec, diffusers_sampler, pixel_sampler

    n = 4
    fixed = cond.select(list(range(min(n, len(cond))))) if cond is not None else _random_conditioning(n, teacher, torch.Generator().manual_seed(1), device)
    spec = SampleSpec(fixed, tuple(range(len(fixed))), shape, steps)
    if teacher.architecture.startswith("diffusers:"):
        sampler = diffusers_sampler(teacher.pipeline_dir, teacher.component, teacher.model.model, spec, teacher.vae_scale) if teacher.pipeline_dir else None
        return (sampler, lambda m: m.model) if sampler else None
    if shape[0] != 3:
        return None
    return pixel_sampler(spec), lambda m: m


def _check_same_run(out: Path, identity: dict, write: bool) -> None:
    """A run folder resumes only the run it holds (OUT/run.json: teacher architecture and config, binarization):
    another teacher's state failed to load deep in torch, and another binarization silently changed the student mid-run."""
    import json

    from ..atomic import atomic_write

    path = out / "run.json"
    identity = json.loads(json.dumps(identity, default=str))  # as it reads back
    if path.exists() and (out / "state.pt").exists():
        recorded = json.loads(path.read_text())
        if recorded.get("architecture") != identity["architecture"] or recorded.get("config") != identity["config"]:
            raise click.ClickException(
                f"{out} holds a run with another teacher ({recorded.get('architecture')}, other config): "
                "resume it with that teacher, or pass a new -o"
            )
        if recorded.get("binarize") != identity["binarize"]:
            b = recorded.get("binarize") or {}
            raise click.ClickException(
                f"{out} holds a run with --scheme {b.get('scheme')} --group-size {b.get('group_size')} --rank {b.get('rank')}: "
                "resume it with those, or pass a new -o"
            )
    if write:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(identity, indent=2) + "\n"))


@click.command()
@click.argument("teacher", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder (resumable).")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Prompts, one per line, encoded once by the teacher's own text encoder(s) (MiniLM for Bonsai DiTs, the pipeline's for diffusers).")
@click.option("--text-encoder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="MiniLM folder for --prompts with Bonsai DiTs (e.g. an int8 export); default: the installed one.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Image folder (pixel-space DiTs).")
@click.option("--latent-size", type=click.IntRange(min=1), default=None, help="Side of the training latents; default: the model's sample_size (64 if it has none).")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="Training steps in all; a resumed run continues up to this count.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Per-process batch size.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Peak AdamW learning rate: warmup over min(100, steps/10) steps, then cosine decay to 10%.")
@click.option("--scheme", type=click.Choice(["xnor", "mean", "onebit"]), default="mean", show_default=True,
              help="Binarization of the student's 1-bit layers: xnor (a sign(W)), mean (mean-centred rows) or onebit "
                   "(sign(W) times rank-1 scales; --group-size 0).")
@click.option("--group-size", type=click.IntRange(min=0), default=0, show_default=True, help="One scale per this many input columns (0: per row).")
@click.option("--rank", "lowrank", type=click.IntRange(min=0), default=0, show_default=True,
              help="Rank of a trainable low-rank residual beside each 1-bit layer, stored in bf16 (0: none).")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Print and append to OUT/log.jsonl the loss, gradient norm, lr and speed every N steps (and at the end).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Save the resumable state OUT/state.pt every N steps (and at the end).")
@click.option("--sample-every", type=click.IntRange(min=0), default=0, show_default=True, help="Write a teacher/student sample grid to OUT/samples every N steps (and at the end); 0: only at the end.")
@click.option("--sample-steps", type=click.IntRange(min=1), default=8, show_default=True, help="Sampler steps per grid image.")
@click.option("--samples/--no-samples", "samples", default=True, show_default=True, help="Write sample grids at all.")
@click.option("--fsdp", is_flag=True, help="Shard the student across the torchrun processes (torch FSDP2, one block at a time) instead of replicating it (DDP).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the timesteps and noise, the training batches (plus each process's rank) and the probe batches.")
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True, help="torch.compile the student's forward on CUDA.")
def distill(teacher, out, prompts, text_encoder, images, latent_size, steps, batch, lr, scheme, group_size, lowrank, log_every,
            checkpoint_every, sample_every, sample_steps, samples, fsdp, seed, compile_) -> None:
    """Distill a 1-bit student from the full-precision TEACHER (Bonsai float checkpoint or diffusers folder)."""
    import torch

    from ..models import save_model
    from ..quant import BinarizeConfig, QuantPolicy, to_inference_
    from .distill import distill_loss, evaluate_loss, make_student
    from .loop import TrainConfig, rank, train, world_size
    from .prompt_encoding import PromptEncodingError
    from .samples import write_grid

    device = _init_distributed()
    if fsdp and world_size() == 1:
        raise click.ClickException("--fsdp shards the student across processes: launch with torchrun --nproc_per_node N (N >= 2)")
    torch.manual_seed(seed)  # same initial student on every rank
    try:  # a bad combination of options fails now, before the teacher loads
        binarize = BinarizeConfig(scheme, group_size, lowrank)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)  # an unusable run folder fails now, not after loading the teacher
    except OSError as e:
        raise click.ClickException(f"{out}: cannot create the run folder ({e.strerror})") from None
    try:
        lines = [p.strip() for p in prompts.read_text().splitlines() if p.strip()] if prompts else None
        if prompts and not lines:
            raise click.ClickException(f"{prompts} holds no prompts: write one per line (or leave out --prompts for random text states)")
        t = _load_teacher(teacher)
        _check_same_run(out, {"architecture": t.architecture, "config": t.config, "binarize": binarize.to_dict()}, rank() == 0)
        size = latent_size or t.config.get("sample_size", 64)
        multiple, why = _latent_multiple(t.config)
        if size % multiple:
            raise click.BadParameter(f"{size} is not a multiple of {multiple} ({why})", param_hint="'--latent-size'")
        shape = t.model.latent_shape(size) if hasattr(t.model, "latent_shape") else (t.config.get("in_channels", 3), size, size)
        cond = _conditioning(t, lines, text_encoder, device)
    except (ValueError, PromptEncodingError) as e:
        raise click.ClickException(str(e)) from None
    model = t.model.to(device)
    policy = QuantPolicy(binarize, keep=t.keep)
    student = make_student(model, policy).to(device)
    loss_fn = distill_loss(model)
    pixels = _load_images(images, shape, device)
    probe = [b for b, _ in zip(_batches(shape, t, batch, cond, pixels, device, seed + 10_000), range(2))]
    before = evaluate_loss(loss_fn, student, probe)
    if fsdp and samples and rank() == 0:
        click.echo("--fsdp: no sample grids (sampling a sharded student from one rank is not supported yet)")
    sampling = _sampler(t, cond, shape, sample_steps, device) if samples and not fsdp and rank() == 0 else None
    if fsdp:
        from .fsdp import shard_

        shard_(student)

    def on_sample(module, step: int) -> None:
        inner = sampling[1]
        click.echo(f"samples: {write_grid(sampling[0], inner(model), inner(module), out, step)}")

    cfg = TrainConfig(steps=steps, lr=lr, warmup=min(100, steps // 10), log_every=log_every, checkpoint_every=checkpoint_every,
                      sample_every=sample_every, compile=compile_)
    batches = _batches(shape, t, batch, cond, pixels, device, seed + rank())
    start = time.perf_counter()
    done = train(student, loss_fn, batches, cfg, out, on_sample=on_sample if sampling else None).step
    seconds = time.perf_counter() - start
    after = evaluate_loss(loss_fn, student, probe) if fsdp else None  # a sharded forward is collective: every rank
    if fsdp:
        from .fsdp import full_model_state

        full = full_model_state(student)  # collective; on rank 0's CPU only
        if rank() == 0:  # the plain student, for saving
            student = make_student(t.model, policy).cpu()
            student.load_state_dict(full)
    if rank() == 0:
        after = evaluate_loss(loss_fn, student, probe) if after is None else after
        click.echo(f"student-teacher loss on fixed probe batches: {before:.6f} before, {after:.6f} after")
        click.echo(f"{done} steps x {batch} samples x {world_size()} process(es) in {seconds:.1f} s (incl. start-up and compile)")
        if sampling and not (sample_every and done % sample_every == 0):
            on_sample(student, done)
        inner = student.model if hasattr(student, "model") and t.architecture.startswith("diffusers:") else student
        to_inference_(inner)
        save_model(inner, out / "student.safetensors", t.architecture, t.config,
                   provenance={"teacher": str(teacher.resolve()), "method": "distillation", "steps": done}, **t.inherited)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
