"""Text encoders."""

from .minilm import TextEncoder

__all__ = ["TextEncoder"]
