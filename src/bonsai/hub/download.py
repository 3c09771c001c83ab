"""Resumable, verified HTTP downloads into a `.part` file.

A download appends to `<part>` with an HTTP Range request when a previous attempt left bytes
behind, hashes everything it holds, and returns only when the file is complete and (if a sha256
is known) verified. The `.part` suffix stays until the caller has validated the contents and
renamed it, so a partial or unchecked file never looks like a model.

The first response's validator (a strong ETag, else Last-Modified) is kept in `<part>.validator`
and sent as `If-Range` when resuming: a server whose file changed meanwhile answers 200 with the
whole new file, so the bytes of two versions are never joined. Without a recorded validator a
resume trusts the server, as before.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from .errors import ChecksumMismatch, DiskFull, DownloadError

CHUNK = 1 << 20
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class Downloaded:
    """A complete download: the `.part` file holding it, its size and sha256 (hex)."""

    part: Path
    size: int
    sha256: str


def hf_url(spec: str) -> str:
    """Map `hf:OWNER/REPO/PATH/IN/REPO` to `{HF_ENDPOINT}/OWNER/REPO/resolve/main/PATH/IN/REPO`."""
    parts = spec.removeprefix("hf:").strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise DownloadError(f"{spec!r}: expected hf:OWNER/REPO/FILE, e.g. hf:bonsai/emoji/model.safetensors")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{parts[0]}/{parts[1]}/resolve/main/{'/'.join(parts[2:])}"


def check_sha256(value: str, where: str) -> str:
    """Normalize a sha256 given by a user, a registry or a sidecar file (64 hex digits)."""
    digest = value.strip().lower()
    if not _SHA256.match(digest):
        raise DownloadError(f"{where}: {value!r} is not a sha256 (64 hex digits)")
    return digest


def fetch_sidecar_sha256(url: str, client: httpx.Client) -> str | None:
    """The sha256 published beside `url` as `url + ".sha256"` (`sha256sum` format), or None."""
    sidecar = url + ".sha256"
    try:
        response = client.get(sidecar)
    except httpx.TransportError as exc:
        raise DownloadError(f"{sidecar}: network error ({exc}); check the connection and retry") from exc
    if response.status_code == 404:
        return None
    _raise_for_status(response, sidecar)
    words = response.text.split()
    if not words:
        raise DownloadError(f"{sidecar}: empty checksum file")
    return check_sha256(words[0], sidecar)


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a whole file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    part: Path,
    *,
    sha256: str | None = None,
    client: httpx.Client | None = None,
    progress: bool = True,
) -> Downloaded:
    """Download `url` into `part`, resuming from the bytes already there.

    Raises DownloadError on network/HTTP failure or a dropped connection (the partial file is
    kept so the next call resumes), DiskFull when the remaining bytes do not fit, and
    ChecksumMismatch (after deleting `part`) when the bytes do not hash to `sha256`.
    """
    own_client = client is None
    client = client or httpx.Client(timeout=TIMEOUT, follow_redirects=True)
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
        # One restart is allowed when the server cannot resume (416 on a stale partial file).
        result = _transfer(url, part, client, progress) or _transfer(url, part, client, progress)
    finally:
        if own_client:
            client.close()
    if result is None:
        raise DownloadError(f"{url}: the server refuses byte ranges for this file; delete {part} and retry")
    _validator_path(part).unlink(missing_ok=True)  # complete: nothing left to resume
    if sha256 is not None and result.sha256 != sha256:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{url}: checksum mismatch (expected sha256 {sha256}, received {result.sha256}); "
            "the download was deleted: check the URL and checksum"
        )
    return result


def _transfer(url: str, part: Path, client: httpx.Client, progress: bool) -> Downloaded | None:
    """One request: returns the completed download, or None after discarding an unusable partial file."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # byte offsets must refer to the file itself
    if have:
        headers["Range"] = f"bytes={have}-"
        if _validator_path(part).exists():
            headers["If-Range"] = _validator_path(part).read_text(encoding="utf-8")
    try:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 416:
                total = _range_total(response.headers.get("Content-Range", ""))
                if total == have:
                    return Downloaded(part, have, sha256_file(part))
                _discard(part)
                return None
            _raise_for_status(response, url)
            length = response.headers.get("Content-Length")
            remaining = int(length) if length is not None else None
            if response.status_code == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range", ""), url)
                if start != have:
                    _discard(part)
                    raise DownloadError(f"{url}: server resumed at byte {start}, not {have}; retry to start over")
            else:  # 200: the whole file, whether or not a range was asked for (or the file changed)
                have, total = 0, remaining
            _check_space(part, remaining)
            if not have:
                _start_over(part, _validator(response))
            return _receive(response, part, have, total, progress)
    except httpx.TransportError as exc:
        got = part.stat().st_size if part.exists() else 0
        fix = f"the partial download is kept in {part}: run the same command again to resume" if got else "check the connection and retry"
        raise DownloadError(f"{url}: network error after {got} bytes ({exc.__class__.__name__}: {exc}); {fix}") from exc


def _validator_path(part: Path) -> Path:
    """Where the validator of the version being downloaded into `part` is kept."""
    return part.with_name(part.name + ".validator")


def _validator(response: httpx.Response) -> str | None:
    """The response's strong ETag, else its Last-Modified date: what If-Range may name (RFC 9110)."""
    etag = response.headers.get("ETag")
    if etag is not None and not etag.startswith("W/"):  # If-Range compares strongly: weak tags never match
        return etag
    return response.headers.get("Last-Modified")


def _start_over(part: Path, validator: str | None) -> None:
    """Empty `part`, then record the validator of the version that will fill it (or forget the old one)."""
    part.write_bytes(b"")  # first, so that old bytes never sit beside the new version's validator
    if validator is None:
        _validator_path(part).unlink(missing_ok=True)
    else:
        _validator_path(part).write_text(validator, encoding="utf-8")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validator_path(part).unlink(missing_ok=True)


def _receive(response: httpx.Response, part: Path, have: int, total: int | None, progress: bool) -> Downloaded:
    """Append the body to `part` (truncating first when `have` is 0) and hash the whole file."""
    digest = hashlib.sha256()
    if have:
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    size = have
    bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
               desc=part.name.removesuffix(".part"), disable=not progress, leave=False)
    try:
        with open(part, "ab" if have else "wb") as f:
            for chunk in response.iter_bytes():  # as received: a re-chunking buffer would lose bytes on a drop
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull(f"{part}: disk full after {size} bytes; free space and run again to resume") from exc
        raise
    finally:
        bar.close()
    if total is not None and size != total:
        raise DownloadError(f"{response.url}: got {size} of {total} bytes; run the same command again to resume")
    return Downloaded(part, size, digest.hexdigest())


def _check_space(part: Path, remaining: int | None) -> None:
    """Fail before writing when the remaining bytes do not fit on the disk holding `part`."""
    if remaining is None:
        return
    free = shutil.disk_usage(part.parent).free
    if remaining > free:
        raise DiskFull(
            f"{part.parent}: not enough disk space ({remaining} bytes needed, {free} free); "
            "free space or set BONSAI_HOME to another disk"
        )


def _raise_for_status(response: httpx.Response, url: str) -> None:
    if response.status_code == 404:
        raise DownloadError(f"{url}: not found (HTTP 404); check the name or URL")
    if response.status_code >= 400:
        raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason_phrase}")


def _parse_content_range(value: str, url: str) -> tuple[int, int | None]:
    """`bytes START-END/TOTAL` -> (START, TOTAL or None when '*')."""
    match = _CONTENT_RANGE.match(value.strip())
    if match is None:
        raise DownloadError(f"{url}: invalid Content-Range {value!r} in a 206 response")
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _range_total(value: str) -> int | None:
    """TOTAL of a 416 response's `bytes */TOTAL`, or None."""
    match = re.match(r"^bytes \*/(\d+)$", value.strip())
    return int(match.group(1)) if match else None
