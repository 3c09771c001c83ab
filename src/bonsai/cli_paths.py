"""Output folders for the commands: made and checked before any slow work, so that a bad -o is a
one-line error at once rather than a traceback after minutes of building or generating."""

from __future__ import annotations

import os
from pathlib import Path

import click


def writable_dir(path: Path, option: str = "-o") -> Path:
    """Make `path` (and its parents) if missing and check that files can be created in it; a
    click error naming the folder and `option` otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.ClickException(f"cannot create output directory {path}: {e.strerror}; choose another with {option}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise click.ClickException(f"output directory {path} is not writable; choose another with {option}")
    return path
