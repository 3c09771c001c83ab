"""Errors the APIs turn into 4xx JSON responses."""

from __future__ import annotations


class FieldError(ValueError):
    """A request field is invalid; `field` names it (dotted for nested fields)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


class QueueFull(RuntimeError):
    """The job queue holds its maximum; the client should retry later (HTTP 429)."""
