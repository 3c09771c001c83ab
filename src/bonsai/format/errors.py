"""The one error type of the checkpoint format."""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read.

    The message names the file, the tensor or field, what was expected, and what to do:
    "model.safetensors: tensor 'blocks.0.attn.qkv.signs' has shape (96, 8), expected (96, 4);
    the file does not match its quantization metadata: re-export it".
    """

    def __init__(self, problem: str, path: str | os.PathLike[str] | None = None, fix: str | None = None):
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self.fix = fix
        message = problem if self.path is None else f"{self.path}: {problem}"
        super().__init__(message if not fix else f"{message}; {fix}")
