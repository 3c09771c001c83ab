"""Where a model's weights live while it runs: the memory-lean pipeline's two tools.

- `on_device(module, device)`: the module's tensors get copies on `device` for the duration of a
  `with` block, then the originals (e.g. memory-mapped CPU tensors) come back and the copies are
  freed. One part of a pipeline occupies the accelerator at a time.
- `sequential_offload(blocks, device)`: inside it, each block's tensors move to `device` just
  before the block runs and are released right after: the accelerator holds one block at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


def _swap(module: nn.Module, device: torch.device, skip: Iterable[nn.Module] = ()) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """Replace every tensor of `module` (outside the `skip` submodules) by a copy on `device`;
    return what to put back."""
    skipped = {id(m) for s in skip for m in s.modules()}
    saved = []
    for m in module.modules():
        if id(m) in skipped:
            continue
        for is_param, store in ((True, m._parameters), (False, m._buffers)):
            for key, t in list(store.items()):
                if t is None or t.device == device:
                    continue
                saved.append((m, key, is_param, t))
                moved = t.detach().to(device, non_blocking=True)
                store[key] = nn.Parameter(moved, requires_grad=False) if is_param else moved
    return saved


def _restore(saved: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> None:
    for m, key, is_param, t in saved:
        (m._parameters if is_param else m._buffers)[key] = t


@contextmanager
def on_device(module: nn.Module, device: str | torch.device, skip: Iterable[nn.Module] = ()) -> Iterator[nn.Module]:
    """Run `module` on `device` inside the block (except the `skip` submodules); its own tensors are
    untouched and come back after."""
    saved = _swap(module, torch.device(device), skip)
    try:
        yield module
    finally:
        _restore(saved)


@contextmanager
def sequential_offload(blocks: Iterable[nn.Module], device: str | torch.device) -> Iterator[None]:
    """Move each block to `device` only while its forward runs."""
    device = torch.device(device)
    pending: dict[int, list] = {}

    def before(block: nn.Module, args) -> None:
        pending[id(block)] = _swap(block, device)

    def after(block: nn.Module, args, output) -> None:
        _restore(pending.pop(id(block), []))

    with ExitStack() as stack:
        for block in blocks:
            stack.callback(block.register_forward_pre_hook(before).remove)
            stack.callback(block.register_forward_hook(after).remove)
        try:
            yield
        finally:
            for saved in pending.values():
                _restore(saved)
            pending.clear()
