"""`pull`: bring a model into the store from a known name, a URL or `hf:OWNER/REPO/FILE`.

Known names come from `$BONSAI_HOME/registry.json`:

    {"models": {"NAME": {"url": "https://...", "sha256": "<hex, optional>"}}}

The expected sha256 is, in order: the caller's, the registry's, a `URL.sha256` sidecar. A model
already present is returned without any network access, so pulling works offline for it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from .catalog import ModelEntry
from .download import TIMEOUT, check_sha256, download, fetch_sidecar_sha256, hf_url
from .errors import HubError, InvalidCheckpoint, ModelNotFound
from .store import BUILTIN_NAME, Store

REGISTRY_FILE = "registry.json"


@dataclass(frozen=True)
class KnownModel:
    """A registry entry: where a named model is published and, optionally, its sha256."""

    url: str
    sha256: str | None = None


@dataclass(frozen=True)
class Pulled:
    """The outcome of a pull: the entry, whether bytes were downloaded, and whether a known sha256 checked them."""

    entry: ModelEntry
    downloaded: bool
    verified: bool


def known_models(store: Store) -> dict[str, KnownModel]:
    """The registry of `store` (empty when the file is absent)."""
    path = store.home / REGISTRY_FILE
    if not path.exists():
        return {}
    try:
        models = json.loads(path.read_text(encoding="utf-8"))["models"]
        return {
            name: KnownModel(item["url"], check_sha256(item["sha256"], f"{path}: {name}") if item.get("sha256") else None)
            for name, item in models.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HubError(f"{path}: invalid registry ({exc}); expected {{\"models\": {{NAME: {{\"url\": ..., \"sha256\": ...}}}}}}") from None


def source_url(spec: str) -> str | None:
    """The URL a pull spec names (http/https or hf:), or None for a model name."""
    if spec.startswith("hf:"):
        return hf_url(spec)
    if urlsplit(spec).scheme in ("http", "https"):
        return spec
    return None


def part_path(store: Store, url: str) -> Path:
    """Where the download of `url` lives until verified: unique per URL, so a retry resumes it."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urlsplit(url).path).name) or "model"
    return store.downloads_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{stem}.part"


def pull(
    store: Store,
    spec: str,
    *,
    name: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Pulled:
    """Pull `spec` (NAME[@VERSION], http(s) URL or hf:OWNER/REPO/FILE) into `store`."""
    sha256 = check_sha256(sha256, "--sha256") if sha256 else None
    url = source_url(spec)
    if url is None:
        present = store.find(spec)
        if present is not None and store.problem(present) is None:
            return Pulled(present, downloaded=False, verified=False)
        if spec == BUILTIN_NAME:
            raise ModelNotFound(f"{BUILTIN_NAME}: the built-in weights are missing from {store.builtin_path}; reinstall bonsai")
        known = known_models(store).get(spec.partition("@")[0])
        if known is None:
            raise ModelNotFound(
                f"{spec!r} is neither in the store nor in {store.home / REGISTRY_FILE}; "
                "pull a URL or hf:OWNER/REPO/FILE instead (known: " + ", ".join(store.known_refs()) + ")"
            )
        url, sha256, name = known.url, sha256 or known.sha256, name or spec.partition("@")[0]
    else:
        for entry in store.entries():
            if entry.source == url and (sha256 is None or entry.sha256 == sha256) and store.problem(entry) is None:
                return Pulled(entry, downloaded=False, verified=False)

    with httpx.Client(timeout=TIMEOUT, follow_redirects=True) as client:
        if sha256 is None:
            sha256 = fetch_sidecar_sha256(url, client)
        result = download(url, part_path(store, url), sha256=sha256, client=client, progress=progress)
    try:
        entry = store.add(result.part, url, name=name, sha256=result.sha256, mode="move")
    except InvalidCheckpoint as exc:
        result.part.unlink(missing_ok=True)  # so name the URL: the message named this file, now gone
        problem = str(exc).removeprefix(f"{result.part}: ")
        raise InvalidCheckpoint(f"{url}: the downloaded file was deleted: {problem}") from None
    return Pulled(entry, downloaded=True, verified=sha256 is not None)
