"""`bonsai eval`: compare model variants on held-out prompts (thin over bonsai.eval.compare)."""

from __future__ import annotations

from pathlib import Path

import click

from .compare import DEFAULT_EVALUATOR, PROMPT_FORMS, EvalConfig


def _parse_models(values: tuple[str, ...]) -> dict[str, str]:
    models: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r}: write NAME=PATH, e.g. teacher=runs/emoji/export/bonsai-emoji-teacher.safetensors", param_hint="--model")
        if name in models:
            raise click.BadParameter(f"model name {name!r} is given twice", param_hint="--model")
        models[name] = path
    return models


@click.command("eval")
@click.option("--model", "model_specs", multiple=True, required=True, metavar="NAME=PATH",
              help="A model to evaluate (repeatable); columns of the sample grid follow this order.")
@click.option("--reference", default="teacher", show_default=True,
              help="The model NAME that PSNR/SSIM compare against; 'none' for no comparison.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("data/emoji"),
              show_default=True, help="Emoji dataset folder (bonsai data emoji); its eval split gives prompts and real images.")
@click.option("--evaluator", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_EVALUATOR,
              help="Evaluator folder (default: the shipped emoji evaluator).")
@click.option("--prompts", type=click.IntRange(min=2), default=None, help="Held-out prompts to use, a fixed evenly spaced subset [default: all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Prompt i is generated with seed + i.")
@click.option("--steps", type=click.IntRange(1, 1000), default=20, show_default=True, help="Sampling steps per image.")
@click.option("--cfg", type=click.FloatRange(0, 50), default=4.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per denoiser batch.")
@click.option("--grid-rows", type=click.IntRange(min=1), default=8, show_default=True, help="Prompts shown in the sample grid.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, mps or auto.")
@click.option("--prompt-form", type=click.Choice(list(PROMPT_FORMS)), default="full", show_default=True,
              help="Prompt with the full training caption or the bare emoji name; adherence is scored against the full caption either way.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for eval.json, eval.md, samples.png.")
def eval_cmd(model_specs, reference, data, evaluator, prompts, seed, steps, cfg, batch_size, grid_rows, device, prompt_form, out) -> None:
    """Generate held-out prompts with every model on the same seeds and score them: Fréchet
    distance, top-1/top-5 prompt adherence, PSNR/SSIM against the reference, seconds per image."""
    from tqdm import tqdm

    from ..cli_paths import writable_dir
    from ..hub import ModelNotFound
    from ..pipeline import InvalidRequest
    from .compare import compare_models
    from .report import markdown_table, sample_grid, write_report

    models = _parse_models(model_specs)
    ref = None if reference.lower() == "none" else reference
    if ref is not None and ref not in models:
        raise click.BadParameter(f"{ref!r} is not one of the --model names {sorted(models)}", param_hint="--reference")
    writable_dir(out)  # before minutes of generating, not after
    config = EvalConfig(prompts=prompts, seed=seed, steps=steps, cfg=cfg, batch_size=batch_size, reference=ref, device=device,
                        prompt_form=prompt_form)
    with tqdm(unit="img", desc="generating") as bar:

        def progress(n: int, total: int) -> None:
            bar.total = total
            bar.update(n)

        try:
            report, runs, real = compare_models(models, data, config, evaluator, progress=progress)
        except (InvalidRequest, ModelNotFound, FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from None
    grid = sample_grid({"real": real, **{name: run.images for name, run in runs.items()}}, grid_rows)
    paths = write_report(report, grid, grid_rows, out)
    click.echo(markdown_table(report))
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")
