"""One entry point for every 1-bit layer: bitmatmul(x, weight).

Kernels register themselves per device type, fastest first. The first registered kernel whose
`supports(x, weight)` says yes runs; the reference path is always last and always works.
`BONSAI_KERNEL=<name>` (or `set_kernel(name)`) forces one kernel, for comparisons.

Row operations (fusion.py) around the product: a kernel names the parts it fuses (Kernel.fuses);
the dispatcher gives it the largest share that keeps their order and applies the rest with the
torch references before and after it.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .fusion import PARTS, Epilogue, Prologue, apply_epilogue, apply_prologue, split
from .packed import PackedWeight
from .reference import bitmatmul_reference

log = logging.getLogger(__name__)

KernelFn = Callable[[torch.Tensor, PackedWeight], torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    name: str
    device_types: tuple[str, ...]  # e.g. ("cuda",), ("cpu",)
    fn: KernelFn
    supports: Callable[[torch.Tensor, PackedWeight], bool] = lambda x, w: True
    fuses_bias: bool = False  # fn(x, weight, bias) adds the bias itself (one pass over the output)
    # Parts of fusion.py's row operations the kernel applies itself (fusion.PARTS: "prologue", "gelu",
    # "head_norm", "residual"). When not empty, fn(x, weight, bias, prologue, epilogue) is called with
    # the share fusion.split gives it (and adds the bias).
    fuses: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.fuses <= PARTS:
            raise ValueError(f"kernel {self.name!r}: unknown fusion parts {sorted(self.fuses - PARTS)}")
        if self.fuses and not self.fuses_bias:
            raise ValueError(f"kernel {self.name!r}: a kernel that fuses row operations must add the bias too")

    @property
    def fuses_rows(self) -> bool:
        """Whether it applies every row operation itself."""
        return self.fuses == PARTS


REFERENCE = Kernel("reference", ("cpu", "cuda", "mps"), bitmatmul_reference)
_registry: list[Kernel] = []
_forced: str | None = None
# Modules that register fast kernels when imported; a missing optional build is not an error.
_PLUGINS = ("bonsai.kernels.cpu", "bonsai.kernels.triton")
_plugins_loaded = False


def register_kernel(kernel: Kernel) -> None:
    """Add a kernel ahead of the reference path (later registrations win over earlier ones)."""
    _registry.insert(0, kernel)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _PLUGINS:
        try:
            importlib.import_module(module)
        except ImportError as err:
            log.debug("kernel plugin %s not available: %s", module, err)


def available_kernels() -> list[str]:
    _load_plugins()
    return [k.name for k in _registry] + [REFERENCE.name]


def set_kernel(name: str | None) -> None:
    """Force one kernel by name (None: automatic choice; BONSAI_KERNEL applies when unset)."""
    if name is not None and name not in available_kernels():
        raise ValueError(f"unknown kernel {name!r}; available: {', '.join(available_kernels())}")
    global _forced
    _forced = name


def select_kernel(x: torch.Tensor, weight: PackedWeight) -> Kernel:
    _load_plugins()
    forced = _forced or os.environ.get("BONSAI_KERNEL") or None
    candidates = _registry + [REFERENCE]
    if forced is not None and forced != "auto":
        for kernel in candidates:
            if kernel.name == forced:
                if x.device.type not in kernel.device_types:
                    raise RuntimeError(f"kernel {forced!r} does not run on {x.device.type}")
                return kernel
        raise ValueError(f"BONSAI_KERNEL={forced!r} is not a kernel; available: {', '.join(available_kernels())}")
    for kernel in candidates:
        if x.device.type in kernel.device_types and kernel.supports(x, weight):
            return kernel
    return REFERENCE


def fuses_rows(x: torch.Tensor, weight: PackedWeight) -> bool:
    """Whether bitmatmul(x, weight, ...) runs all of its prologue and epilogue inside the kernel."""
    return select_kernel(x, weight).fuses_rows


def fused_parts(x: torch.Tensor, weight: PackedWeight) -> frozenset[str]:
    """The row operations (fusion.PARTS) the kernel chosen for bitmatmul(x, weight, ...) can run inside."""
    return select_kernel(x, weight).fuses


def bitmatmul(
    x: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None = None,
    prologue: Prologue | None = None,
    epilogue: Epilogue | None = None,
) -> torch.Tensor:
    """y = epilogue(prologue(x) @ W.T + bias) for x [..., K] ([B, T, K] when the prologue or
    epilogue has per-sample rows), a packed 1-bit W [N, K] and bias [N] or None; returns [..., N]
    in x.dtype. Prologue and epilogue (fusion.py) are optional."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"bitmatmul: x has K={x.shape[-1]}, weight expects K={weight.in_features}")
    kernel = select_kernel(x, weight)
    share = split(prologue, epilogue, kernel.fuses)
    if share.before is not None:
        x = apply_prologue(x, share.before)
    if kernel.fuses:
        y = kernel.fn(x, weight, bias, share.prologue, share.epilogue)
    elif kernel.fuses_bias:
        y = kernel.fn(x, weight, bias)
    else:
        y = kernel.fn(x, weight)
        y = y if bias is None else y + bias.to(y.dtype)
    # y is this call's own fresh output: the rest of the epilogue may overwrite it (unless autograd needs it)
    return y if share.after is None else apply_epilogue(y, share.after, inplace=not y.requires_grad)
