"""`bonsai data`: build training datasets."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def data() -> None:
    """Build training datasets."""


@data.command("emoji")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder holding the unpacked emoji-datasource-google/-twitter packages (default: fetch with npm).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/emoji"), show_default=True,
              help="Folder to write the dataset bundle into.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where npm packages are kept (default: $BONSAI_CACHE/npm or ~/.cache/bonsai/npm).")
@click.option("--bits", type=click.Choice(["6", "8"]), default="6", show_default=True,
              help="Bits per stored text-state value (6 keeps the bundle under ~60 MB).")
@click.option("--states/--no-states", default=True, show_default=True,
              help="Store MiniLM token states of the captions (the evaluator needs them; a trainer that carries the encoder does not).")
def emoji(source: Path | None, out: Path, cache: Path | None, bits: str, states: bool) -> None:
    """Build the bonsai-emoji dataset (Noto Emoji + Twemoji, 64x64, captions, text states)."""
    from ..cli_paths import writable_dir
    from .build import build_emoji_dataset
    from .fetch import package_dirs

    writable_dir(out)
    try:
        packages = package_dirs(source, cache)
        encode = None
        if states:
            from bonsai.text import TextEncoder

            encode = TextEncoder().encode
        summary = build_emoji_dataset(packages, out, encode, bits=int(bits))
    except (OSError, RuntimeError, ValueError) as e:  # a missing package or image, npm failing, a bad emoji.json
        raise click.ClickException(str(e)) from None
    for style, splits in summary["counts"].items():
        click.echo(f"{style:8s} " + "  ".join(f"{k}: {v}" for k, v in splits.items()))
    click.echo(json.dumps({k: summary[k] for k in ("images", "base_emoji", "base_emoji_eval", "tokens", "bytes")}))
    click.echo(f"wrote {out} ({sum(summary['bytes'].values()) / 1e6:.1f} MB)")
