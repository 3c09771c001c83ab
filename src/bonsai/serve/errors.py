"""Errors the APIs turn into 4xx JSON responses, and their translation into each API's field names."""

from __future__ import annotations

import re
from typing import Mapping


class FieldError(ValueError):
    """A request field is invalid; `field` names it (dotted for nested fields)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


class QueueFull(RuntimeError):
    """The job queue holds its maximum; the client should retry later (HTTP 429)."""


class FieldNames:
    """How a compatible API names the native request's fields, so that its errors name what its client sent.

    fields: native field -> the API's field (an error's `field`); words: native field -> how a message
    names it, where that differs from a field name (A1111's batch is "batch_size * n_iter")."""

    def __init__(self, fields: Mapping[str, str], words: Mapping[str, str]):
        self.fields = dict(fields)
        self.words = dict(words)
        # Whole names only: not inside another name, a path, or a quoted value (a model or LoRA called "batch-2").
        alternatives = "|".join(map(re.escape, sorted(self.words, key=len, reverse=True)))
        self._native_word = re.compile(r"(?<![\w./'-])(" + alternatives + r")(?![\w'-])")

    def field(self, native: str) -> str:
        return self.fields.get(native, native)

    def translate(self, exc: FieldError) -> FieldError:
        """A native request's error, its field and the fields its message names given as this API names them."""
        message = self._native_word.sub(lambda m: self.words[m.group(1)], exc.message)
        return FieldError(self.field(exc.field), message, exc.status)
