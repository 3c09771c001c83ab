"""Architectures a checkpoint can name, and how to build each from its config dict."""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from .dit import DiT, DiTConfig

# architecture name -> builder(config dict) -> module (float skeleton; 1-bit layers are swapped in after)
ARCHITECTURES: dict[str, Callable[[dict], nn.Module]] = {
    "dit": lambda cfg: DiT(DiTConfig.from_dict(cfg)),
}


# Name prefix -> module that registers those architectures when imported (kept out of start-up).
_PLUGINS: dict[str, str] = {"diffusers:": "bonsai.convert.adapters"}


def register_architecture(name: str, builder: Callable[[dict], nn.Module]) -> None:
    ARCHITECTURES[name] = builder


def build_architecture(name: str, config: dict) -> nn.Module:
    for prefix, module in _PLUGINS.items():
        if name.startswith(prefix) and name not in ARCHITECTURES:
            importlib.import_module(module)
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; this Bonsai knows: {', '.join(sorted(ARCHITECTURES))}") from None
    return builder(config)
