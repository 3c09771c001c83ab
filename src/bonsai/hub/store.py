"""The local model store: `$BONSAI_HOME/models/` plus `catalog.json`, and the built-in model.

Layout of a store (default home: the user's cache folder, e.g. ~/.cache/bonsai):

    catalog.json            the entries (see catalog.py)
    models/NAME-VERSION.safetensors
    downloads/*.part        transfers in progress (resumable; never listed as models)
    downloads/*.validator   the ETag or Last-Modified of the version a .part file holds

The built-in model `bonsai-emoji` ships inside the package (bonsai/weights/) and is listed
from there: it is never copied into the store. Nothing here touches the network.
"""

from __future__ import annotations

import datetime
import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from bonsai.format import CheckpointError, Header, check_packed_layers, read_header

from . import catalog
from .catalog import ModelEntry, check_name
from .download import sha256_file
from .errors import DiskFull, HubError, InvalidCheckpoint, ModelNotFound

BUILTIN_NAME = "bonsai-emoji"
BUILTIN_PATH = Path(__file__).resolve().parent.parent / "weights" / f"{BUILTIN_NAME}.safetensors"


def default_home() -> Path:
    """$BONSAI_HOME, else the user's cache folder for bonsai."""
    env = os.environ.get("BONSAI_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("bonsai"))


def read_checkpoint_header(path: Path) -> Header:
    """The checked header of a Bonsai checkpoint (no tensor data read); InvalidCheckpoint otherwise."""
    try:
        header = read_header(path)
        found = {name: (info.dtype, info.shape) for name, info in header.tensors.items()}
        check_packed_layers(header.layers, found, header.path)
    except CheckpointError as exc:
        raise InvalidCheckpoint(str(exc)) from None
    return header


def _metadata_version(header: Header) -> str | None:
    version = header.metadata.get("version")
    return version if isinstance(version, str) and version else None


@dataclass(frozen=True)
class Store:
    """A model store rooted at `home`."""

    home: Path
    builtin_path: Path = field(default_factory=lambda: BUILTIN_PATH)

    @classmethod
    def default(cls) -> "Store":
        return cls(default_home())

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def downloads_dir(self) -> Path:
        return self.home / "downloads"

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.json"

    def entries(self) -> list[ModelEntry]:
        """The catalog's entries (the built-in model is not among them)."""
        return catalog.load(self.catalog_path)

    def builtin(self) -> ModelEntry:
        """The built-in model's entry, read from its header; size 0 and '?' fields when it is absent or unreadable."""
        try:
            meta = read_checkpoint_header(self.builtin_path).metadata
        except InvalidCheckpoint:
            meta = {}
        version = meta.get("version")
        return ModelEntry(
            name=BUILTIN_NAME,
            version=version if isinstance(version, str) and version else "built-in",
            file=str(self.builtin_path),
            size=self.builtin_path.stat().st_size if self.builtin_path.is_file() else 0,
            sha256=None,
            license=meta.get("license", "?"),
            source="built-in",
            architecture=meta.get("architecture", "?"),
            added="",
        )

    def all(self) -> list[ModelEntry]:
        """The built-in model followed by the catalog's entries."""
        return [self.builtin(), *self.entries()]

    def path_of(self, entry: ModelEntry) -> Path:
        return Path(entry.file) if entry.source == "built-in" else self.models_dir / entry.file

    def find(self, ref: str) -> ModelEntry | None:
        """The entry named `name` or `name@version`; without a version, the most recently added one."""
        name, _, version = ref.partition("@")
        matches = [e for e in self.all() if e.name == name and (not version or e.version == version)]
        return max(matches, key=lambda e: e.added) if matches else None

    def get(self, ref: str) -> ModelEntry:
        """Like find, but raises ModelNotFound naming the known models."""
        entry = self.find(ref)
        if entry is None:
            raise ModelNotFound(
                f"no model named {ref!r} (known: {', '.join(self.known_refs())}); "
                "run 'bonsai models pull NAME|URL' or 'bonsai models import PATH', or give a path to a checkpoint"
            )
        return entry

    def known_refs(self) -> list[str]:
        return [BUILTIN_NAME, *(e.ref for e in self.entries())]

    def resolve(self, name_or_path: str | os.PathLike[str]) -> Path:
        """An existing file -> itself; a catalog name (optionally name@version) or 'bonsai-emoji' -> its file."""
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path
        ref = os.fspath(name_or_path)
        meant_as_path = path.is_dir() or "/" in ref or os.sep in ref or ref.endswith(".safetensors")
        if meant_as_path and self.find(ref) is None:  # say what is wrong with the path, not "no model named"
            raise ModelNotFound(f"{ref}: {'a folder, not a checkpoint file' if path.is_dir() else 'no such file'}")
        entry = self.get(ref)
        path = self.path_of(entry)
        if not path.is_file():
            fix = "reinstall bonsai" if entry.source == "built-in" else f"run 'bonsai models rm {entry.ref}' and pull it again"
            raise ModelNotFound(f"{entry.ref}: its file {path} is missing; {fix}")
        return path

    def problem(self, entry: ModelEntry, deep: bool = False) -> str | None:
        """Why `entry` is unusable ('missing', 'size ...', 'sha256 ...', or a header error), or None.

        The shallow check compares file sizes; the deep one recomputes the sha256 (catalog entries)
        or re-reads the header (the built-in model, which has no recorded checksum).
        """
        path = self.path_of(entry)
        if not path.is_file():
            return "missing"
        if entry.source == "built-in":
            try:
                read_checkpoint_header(path)
            except InvalidCheckpoint as exc:
                return f"invalid checkpoint: {exc}"
            return None
        size = path.stat().st_size
        if size != entry.size:
            return f"corrupted: size {size} bytes, catalog says {entry.size}"
        if deep:
            digest = sha256_file(path)
            if digest != entry.sha256:
                return f"corrupted: sha256 {digest}, catalog says {entry.sha256}"
        return None

    def add(
        self,
        path: Path,
        source: str,
        *,
        name: str | None = None,
        sha256: str | None = None,
        mode: str = "copy",
    ) -> ModelEntry:
        """Validate a checkpoint and enter it into the store.

        mode: "copy" (copy to a temporary name, then rename), "link" (hard link) or "move"
        (rename; for downloads, which already live in the store's folder). `sha256`, when given,
        is the already verified digest of `path`. Adding the same bytes under the same
        name@version again is a no-op.
        """
        header = read_checkpoint_header(path)
        name = check_name(name or header.metadata.get("name") or path.name.removesuffix(".part").split(".")[0])
        if name == BUILTIN_NAME:
            raise HubError(f"{name!r} is the built-in model's name; choose another with --name")
        digest = sha256 or sha256_file(path)
        version = check_name(_metadata_version(header) or digest[:12], what="version")
        existing = self.find(f"{name}@{version}")
        if existing is not None:
            if existing.sha256 == digest and self.problem(existing) is None:
                if mode == "move":
                    path.unlink()
                return existing
            raise HubError(f"{existing.ref} is already in the store with other contents; run 'bonsai models rm {existing.ref}' first")
        dest = self.models_dir / f"{name}-{version}.safetensors"
        # "a-b"@"c" and "a"@"b-c" share a file name; compared without case for case-insensitive disks
        owner = next((e for e in self.entries() if e.file.casefold() == dest.name.casefold()), None)
        if owner is not None:
            raise HubError(f"{name}@{version} would be stored as {dest.name}, the file of {owner.ref}; choose another name with --name")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        _place(path, dest, mode)
        entry = ModelEntry(
            name=name,
            version=version,
            file=dest.name,
            size=dest.stat().st_size,
            sha256=digest,
            license=header.metadata["license"],
            source=source,
            architecture=header.metadata["architecture"],
            added=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        catalog.save(self.catalog_path, [*self.entries(), entry])
        return entry

    def remove(self, ref: str) -> ModelEntry:
        """Drop an entry from the catalog, then delete its file (a hard-linked original survives)."""
        entry = self.get(ref)
        if entry.source == "built-in":
            raise HubError(f"{entry.ref} is built into the package and cannot be removed")
        catalog.save(self.catalog_path, [e for e in self.entries() if e != entry])
        self.path_of(entry).unlink(missing_ok=True)
        return entry


def _place(source: Path, dest: Path, mode: str) -> None:
    """Put `source` at `dest` so that `dest` appears only complete."""
    if mode == "move":
        os.replace(source, dest)
    elif mode == "link":
        tmp = dest.with_name(dest.name + ".part")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
            os.replace(tmp, dest)  # over a leftover file that no catalog entry owns, as copy and move do
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise HubError(f"{source}: cannot hard-link into {dest.parent} ({exc.strerror}); import without --link") from None
            raise
    elif mode == "copy":
        tmp = dest.with_name(dest.name + ".part")
        try:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise DiskFull(f"{dest.parent}: disk full while copying {source}; free space and retry") from None
            raise
    else:
        raise ValueError(f"unknown mode {mode!r}")
