"""The catalog: one JSON file listing the models of a store, read and written atomically.

    {"format": "bonsai-catalog", "version": 1, "models": [ModelEntry, ...]}

`file` is relative to the store's `models/` folder, so a store can be moved as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write
from .errors import HubError

FORMAT = "bonsai-catalog"
VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelEntry:
    """One model of the store (or the built-in one, whose `file` is an absolute path)."""

    name: str
    version: str
    file: str
    size: int  # bytes
    sha256: str | None  # hex; None only for the built-in model, which ships without one
    license: str
    source: str  # the URL it was pulled from, "import:<path>", or "built-in"
    architecture: str
    added: str  # ISO 8601 date (UTC); "" for the built-in model

    @property
    def ref(self) -> str:
        """`name@version`, the unambiguous way to name this entry."""
        return f"{self.name}@{self.version}"


def check_name(name: str, what: str = "name") -> str:
    """A model name (or version) usable in `name@version` and as part of a file name."""
    if not NAME_PATTERN.fullmatch(name):  # match() would let '$' accept a trailing newline
        raise HubError(f"{name!r}: invalid model {what} (letters, digits, '.', '_', '-'; no '@' or '/'); choose one with --name")
    return name


def load(path: Path) -> list[ModelEntry]:
    """The entries of the catalog at `path`; an absent file is an empty catalog."""
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubError(f"{path}: unreadable catalog ({exc}); restore it or delete it and re-import the models") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise HubError(f"{path}: not a {FORMAT} version {VERSION} file; delete it and re-import the models")
    fields = {f.name for f in dataclasses.fields(ModelEntry)}
    entries = []
    for i, item in enumerate(doc.get("models", [])):
        if not isinstance(item, dict) or set(item) != fields:
            raise HubError(f"{path}: models[{i}] must have exactly the fields {sorted(fields)}")
        entries.append(ModelEntry(**item))
    return entries


def save(path: Path, entries: list[ModelEntry]) -> None:
    """Write the catalog atomically: a temporary file in the same folder, fsync, rename."""
    doc = {"format": FORMAT, "version": VERSION, "models": [dataclasses.asdict(e) for e in entries]}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8"))
