"""Bonsai: local text-to-image generation with 1-bit diffusion models."""

__version__ = "0.1.0"
