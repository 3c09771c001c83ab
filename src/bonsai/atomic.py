"""Atomic file writes: a reader sees the old file or the complete new one, never half of one."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object], overwrite: bool = True) -> Path:
    """Call write(tmp) on a temporary file beside `path`, flush it to disk, then rename it into
    place. The file gets the usual permissions (0666 minus the umask); on any failure the
    temporary file is removed and `path` is left as it was. With overwrite=False an existing `path`
    (even one another process creates meanwhile) raises FileExistsError instead of being replaced."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _place_new(tmp: str, path: Path) -> None:
    """Give `tmp` the name `path` unless that exists: a hard link fails atomically if it does. Where the
    file system has no hard links, a check then a rename (a narrow race, as good as it gets there)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", os.fspath(path)) from None
        os.replace(tmp, path)
