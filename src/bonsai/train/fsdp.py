"""FSDP (torch FSDP2, `fully_shard`) for students that do not fit one device: parameters,
gradients and optimizer state are sharded across the ranks, one block at a time.

Works with NCCL on GPUs and with gloo on CPU. The checkpoint stays one plain file: the full state
is gathered (a collective: every rank must call) and written by rank 0."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_(model: nn.Module) -> nn.Module:
    """fully_shard every block (each item of the outermost nn.ModuleLists: transformer blocks,
    UNet down/up blocks), then the root for what remains. In place; returns `model`."""
    sharded: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p + ".") for p in sharded):
            for child in module:
                if any(p.requires_grad for p in child.parameters()):
                    fully_shard(child)
            sharded.append(name)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (collective: call on every rank)."""
    return get_model_state_dict(model, options=_FULL)


def full_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, unsharded on CPU (collective)."""
    return get_state_dict(model, optimizer, options=_FULL)


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load full (unsharded) state dicts into the sharded model and optimizer (every rank)."""
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=StateDictOptions(full_state_dict=True))
