"""Local model store, catalog and verified downloads (`bonsai models ...`)."""

from __future__ import annotations

import os
from pathlib import Path

from .catalog import ModelEntry
from .errors import ChecksumMismatch, DiskFull, DownloadError, HubError, InvalidCheckpoint, ModelNotFound
from .store import BUILTIN_NAME, Store, default_home


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """The checkpoint file for a path, a store name (`name` or `name@version`) or 'bonsai-emoji'.

    Raises ModelNotFound with a one-line message listing the known names.
    """
    return Store.default().resolve(name_or_path)


__all__ = [
    "BUILTIN_NAME",
    "ChecksumMismatch",
    "DiskFull",
    "DownloadError",
    "HubError",
    "InvalidCheckpoint",
    "ModelEntry",
    "ModelNotFound",
    "Store",
    "default_home",
    "resolve",
]
