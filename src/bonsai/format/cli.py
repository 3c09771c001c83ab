"""`bonsai info MODEL`: what a checkpoint is, where it came from, and what it costs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .errors import CheckpointError
from .summary import summarize


class OneLineError(click.ClickException):
    """Printed as a single line 'Error: <message>' (as every other command's errors) with exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {' '.join(self.format_message().split())}", err=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _bits(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _rows(title: str, mapping: dict[str, Any]) -> list[str]:
    lines = [title] if mapping else [f"{title:<16}(none)"]
    for key, value in mapping.items():
        shown = value if isinstance(value, (str, int, float)) else json.dumps(value, separators=(", ", ": "))
        lines.append(f"  {key:<21} {shown}")  # a space even after a key longer than the column
    return lines


def render(s: dict[str, Any]) -> str:
    """The summary as an aligned text table."""
    share = f" ({s['fraction_1bit']:.1%})" if s["fraction_1bit"] is not None else ""
    lines = [
        f"{'name':<16}{s['name'] or '(unnamed)'}",
        f"{'architecture':<16}{s['architecture']}",
        f"{'format version':<16}{s['format_version']}",
        f"{'license':<16}{s['license']}",
    ]
    if s["description"]:
        lines.append(f"{'description':<16}{s['description']}")
    lines += [
        f"{'file':<16}{_size(s['file_bytes'])} ({s['file_bytes']:,} bytes), {s['tensors']} tensors",
        f"{'parameters':<16}{_count(s['parameters'])} total: {_count(s['parameters_1bit'])} in "
        f"{_plural(s['layers_1bit'], '1-bit layer')}{share}, {_count(s['parameters_high_precision'])} high precision",
        f"{'bits/weight':<16}{_bits(s['bits_per_weight'])} overall, {_bits(s['bits_per_weight_1bit'])} in 1-bit "
        f"layers, {_bits(s['bits_per_weight_high_precision'])} high precision",
    ]
    lines += _rows(
        "schemes",
        {k: f"{_plural(v['layers'], 'layer')}, {_count(v['parameters'])} params" for k, v in s["schemes"].items()},
    )
    lines += _rows(
        "dtypes",
        {k: f"{_plural(v['tensors'], 'tensor'):>11} {_size(v['bytes']):>12}" for k, v in sorted(s["dtypes"].items())},
    )
    lines += _rows("provenance", s["provenance"])
    lines += _rows("config", s["config"])
    return "\n".join(lines)


def _checkpoint_file(model: str) -> Path:
    """The checkpoint MODEL names: a path or store name (bonsai.hub.resolve), or else a bundle folder
    (`bonsai quantize --bundle copy`) -> the checkpoint in it, the file load_bonsai_pipeline loads."""
    from bonsai.hub import ModelNotFound, resolve  # the store is a layer above the format: imported when the command runs

    try:
        return resolve(model)
    except ModelNotFound as not_found:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise
        from bonsai.convert.bundle import bundled_checkpoint

        try:
            return bundled_checkpoint(folder)
        except CheckpointError:
            raise not_found from None  # not a bundle: resolve's message says what is wrong with the folder


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(model: str, as_json: bool) -> None:
    """Show a checkpoint's name, architecture, provenance, sizes and bits per weight.

    MODEL is a checkpoint path, a model name (see `bonsai models list`) or a folder written by
    `bonsai quantize --bundle copy`."""
    from bonsai.hub import ModelNotFound

    try:
        summary = summarize(_checkpoint_file(model))
    except (CheckpointError, ModelNotFound) as e:
        raise OneLineError(str(e)) from None
    click.echo(json.dumps(summary, indent=2) if as_json else render(summary))
