"""Write a model comparison: JSON report, markdown table and a side-by-side sample grid PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..atomic import atomic_write
from ..pipeline import to_pil
from .compare import PROMPT_FORMS

LABEL_HEIGHT = 14  # pixels above each column for its name (PIL's built-in bitmap font is 11 px)


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return "—"
    return f"{value:.{digits}f}"


def markdown_table(report: dict) -> str:
    """The comparison as a markdown table, one row per model plus the real images and chance."""
    models, real = report["models"], report["real"]
    lines = [
        "| variant | FD ↓ | top-1 ↑ | top-5 ↑ | PSNR vs teacher (dB) ↑ | SSIM vs teacher ↑ | s / image |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in models.items():
        lines.append(
            f"| {name} | {_fmt(m['fd'], 2)} | {_fmt(m['top1'], 3)} | {_fmt(m['top5'], 3)} | "
            f"{_fmt(m.get('psnr'), 2)} | {_fmt(m.get('ssim'), 3)} | {_fmt(m['seconds_per_image'], 2)} |"
        )
    lines.append(f"| real held-out images | {_fmt(real['fd'], 2)} | {_fmt(real['top1'], 3)} | {_fmt(real['top5'], 3)} | — | — | — |")
    lines.append(f"| chance | — | {_fmt(real['chance_top1'], 3)} | {_fmt(real['chance_top5'], 3)} | — | — | — |")
    cfg = report["config"]
    lines += [
        "",
        f"{len(report['prompts'])} held-out prompts ({PROMPT_FORMS[cfg.get('prompt_form', 'full')]}), one image each "
        f"(seeds {report['seeds'][0]}..{report['seeds'][-1]}), "
        f"{cfg['steps']} steps, cfg {cfg['cfg']:g}; retrieval among {int(real['num_candidates'])} held-out captions; "
        f"FD against all held-out real images in the evaluator's feature space (the real row compares the chosen "
        f"prompts' own images with all of them, a floor).",
    ]
    return "\n".join(lines) + "\n"


def sample_grid(columns: dict[str, torch.Tensor], rows: int, scale: int = 2) -> Image.Image:
    """Rows: the first `rows` images of each column; columns: named image batches [N, 3, H, W] in
    [-1, 1] (e.g. real | teacher | ptq | distilled), each headed by its name. Upscaled `scale`x
    with nearest neighbour so single pixels stay visible."""
    tiles = {name: to_pil(images[:rows]) for name, images in columns.items()}
    h, w = next(iter(columns.values())).shape[-2:]
    th, tw = h * scale, w * scale
    n_rows = min(len(t) for t in tiles.values())
    grid = Image.new("RGB", (tw * len(tiles), LABEL_HEIGHT + th * n_rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, images) in enumerate(tiles.items()):
        draw.text((c * tw + 2, 1), name, fill="black")
        for r, im in enumerate(images[:n_rows]):
            grid.paste(im.resize((tw, th), Image.NEAREST), (c * tw, LABEL_HEIGHT + r * th))
    return grid


def write_report(report: dict, grid: Image.Image, grid_rows: int, out: str | Path) -> dict[str, Path]:
    """Write eval.json, eval.md (table + the prompts of the grid's first `grid_rows` rows) and
    samples.png into `out` atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md", "grid": out / "samples.png"}
    pairs = list(zip(report["prompts"], report["seeds"]))[:grid_rows]
    prompts = "\n".join(f"{i + 1}. {p} (seed {s})" for i, (p, s) in enumerate(pairs))
    text = markdown_table(report) + f"\nSample grid `{paths['grid'].name}`, rows top to bottom:\n\n{prompts}\n"
    atomic_write(paths["json"], lambda p: Path(p).write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(paths["markdown"], lambda p: Path(p).write_text(text))
    atomic_write(paths["grid"], lambda p: grid.save(p, format="PNG", optimize=True))
    return paths
