"""Architectures (the Bonsai DiT family) and checkpoint I/O for them."""

from .dit import DiT, DiTConfig
from . import bonsai4b  # registers the "bonsai-t2i" architecture
from .io import build_skeleton, load_model, save_model
from .registry import ARCHITECTURES, build_architecture, register_architecture

__all__ = ["ARCHITECTURES", "DiT", "DiTConfig", "build_architecture", "build_skeleton", "load_model", "register_architecture", "save_model"]
