"""Compare model variants (e.g. teacher / 1-bit PTQ / 1-bit distilled) on the same held-out
prompts and seeds: generate, then score with `evaluate_images`.

    result = compare_models({"teacher": t, "ptq": p, "distilled": d}, "data/emoji", EvalConfig(prompts=96))
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data import load_emoji_dataset
from ..format import read_header
from ..hub import resolve
from ..pipeline import Pipeline
from .evaluate import evaluate_images
from .evaluator import load_evaluator
from .generate import generate_prompts

DEFAULT_EVALUATOR = Path(__file__).resolve().parent.parent / "weights" / "emoji-evaluator"


# What the models are prompted with (form -> description); retrieval always targets the full caption.
PROMPT_FORMS = {
    "full": "full training captions",  # "grinning face, grinning, smileys & emotion, noto style"
    "name": "bare names; retrieval targets the full caption",  # "grinning face", what people type
}


@dataclass(frozen=True)
class EvalConfig:
    prompts: int | None = None  # held-out prompts to generate (None: the whole eval split)
    seed: int = 0  # prompt i gets seed + i
    steps: int = 20
    cfg: float = 4.0
    batch_size: int = 32
    reference: str | None = "teacher"  # the model whose images PSNR/SSIM compare against
    device: str = "cpu"
    prompt_form: str = "full"  # a key of PROMPT_FORMS

    def __post_init__(self) -> None:
        if self.prompt_form not in PROMPT_FORMS:
            raise ValueError(f"prompt_form must be one of {', '.join(PROMPT_FORMS)}, got {self.prompt_form!r}")


@dataclass
class ModelRun:
    """One model's images float32 [N, 3, 64, 64] in [-1, 1] and timings."""

    name: str
    path: str
    images: torch.Tensor
    seconds: float
    load_seconds: float


def held_out_subset(count: int, n: int | None) -> list[int]:
    """A fixed subset of n indices of range(count), evenly spaced (so both emoji styles and every
    category of the ordered eval split are covered); all of them when n is None or >= count."""
    if n is None or n >= count:
        return list(range(count))
    if n < 1:
        raise ValueError(f"prompts must be >= 1, got {n}")
    return [i * count // n for i in range(n)]


def compare_models(
    models: dict[str, str | os.PathLike[str]],
    data: str | os.PathLike[str],
    config: EvalConfig = EvalConfig(),
    evaluator_dir: str | os.PathLike[str] = DEFAULT_EVALUATOR,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, dict[str, ModelRun], torch.Tensor]:
    """Generate each model's images for the chosen held-out prompts and score them.

    Returns (report, runs, real): the JSON-ready report, each model's run, and the real held-out
    images [N, 3, 64, 64] of the chosen prompts. The report holds per model FD (against all real
    held-out images), top-1/top-5 caption retrieval among all held-out captions, PSNR/SSIM against
    the reference model's images, and seconds per image; and the same scores of the real images.
    `progress(n, total)` is called after each batch of n images, total counting every model's."""
    if config.reference is not None and config.reference not in models:
        raise ValueError(f"reference model {config.reference!r} is not among the models {sorted(models)}")
    # every checkpoint's header is read now: a wrong last path fails before the other models generate
    files = {name: resolve(path) for name, path in models.items()}
    for file in files.values():
        read_header(file)
    held = load_emoji_dataset(data).subset("eval")
    if len(held) < 2:
        raise ValueError(f"{data}: the eval split has {len(held)} images; the Fréchet distance needs at least 2")
    pick = held_out_subset(len(held), config.prompts)
    captions = [held.captions[i] for i in pick]  # retrieval targets
    if config.prompt_form == "full":
        prompts = captions
    elif not held.records:
        raise ValueError(f"{data}: the bundle has no caption records, so prompt form {config.prompt_form!r} cannot be built")
    else:
        from ..train.captions import caption_variants

        prompts = [caption_variants(held.records[i])["name"] for i in pick]
    seeds = [config.seed + i for i in range(len(pick))]
    evaluator = load_evaluator(evaluator_dir)

    runs: dict[str, ModelRun] = {}
    for name, path in models.items():
        start = time.perf_counter()
        pipe = Pipeline.from_pretrained(files[name], device=config.device)
        load_seconds = time.perf_counter() - start
        text_encoder = pipe.text_encoder  # MiniLM, the same for every model: it also scores retrieval
        on_batch = None if progress is None else (lambda n: progress(n, len(prompts) * len(models)))
        images, seconds = generate_prompts(pipe, prompts, seeds, config.steps, config.cfg, config.batch_size, on_batch)
        runs[name] = ModelRun(name, str(path), images, seconds, load_seconds)
        del pipe

    real = held.images[pick]

    def score(images: torch.Tensor, teacher: torch.Tensor | None = None) -> dict[str, float]:
        return evaluate_images(
            images, captions, evaluator, text_encoder, reference_images=held.images, teacher_images=teacher, candidates=held.captions
        )

    reference = runs[config.reference].images if config.reference is not None else None
    rows = {}
    for name, run in runs.items():
        metrics = score(run.images, None if name == config.reference else reference)
        rows[name] = {
            "path": run.path,
            **metrics,
            "seconds_per_image": run.seconds / len(prompts),
            "generate_seconds": run.seconds,
            "load_seconds": run.load_seconds,
        }
    report = {
        "config": asdict(config),
        "data": str(data),
        "evaluator": str(evaluator_dir),
        "prompts": prompts,
        "captions": captions,
        "seeds": seeds,
        "models": rows,
        "real": score(real),
        "machine": {
            "device": config.device,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    return report, runs, real
