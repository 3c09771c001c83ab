"""Errors of the model manager. Every message is one line naming the model, file or URL
and what to do next; the CLI prints them as they are."""

from __future__ import annotations


class HubError(Exception):
    """Base of every model-manager error."""


class ModelNotFound(HubError, LookupError):
    """A name or path that is neither a file, a catalog entry nor the built-in model."""


class DownloadError(HubError):
    """Network failure, HTTP error or an interrupted transfer (the partial file is kept)."""


class ChecksumMismatch(DownloadError):
    """The received bytes do not hash to the expected sha256 (the file has been removed)."""


class DiskFull(DownloadError):
    """Not enough free space for the download, checked before writing and on ENOSPC."""


class InvalidCheckpoint(HubError):
    """A file that is not a readable Bonsai checkpoint."""
