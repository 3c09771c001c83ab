"""LoRA on 1-bit (and float) models: load diffusers/PEFT and kohya/A1111 files as bf16 side
branches, stack and weight them, parse `<lora:name:0.8>` in prompts, and save trained ones.

    names = apply_lora(model, "style.safetensors", weight=0.8)   # several calls stack
    set_lora_weights(model, {"style": 0.0})                       # switch off without unloading
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_write
from .formats import LoRAError, LoRAFactors, parse_lora, read_lora
from .layers import LoRALayer, add_trainable_lora, fit_factors, lora_targets, wrap

_PROMPT_LORA = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def apply_lora(
    model: nn.Module, lora: str | os.PathLike[str] | dict[str, LoRAFactors], weight: float = 1.0,
    name: str | None = None, dtype: torch.dtype = torch.bfloat16,
) -> str:
    """Attach a LoRA (file path or parsed factors) to `model` with `weight`; returns its name.
    All layers are checked before any is changed, so a LoRA for a different model changes nothing.
    The name defaults to the file name without suffix, with '.' as '_' (a '.' cannot name a parameter)."""
    if isinstance(lora, dict):
        factors, name = lora, name or "lora"
    else:
        factors = read_lora(lora, set(lora_targets(model)))
        name = name or Path(lora).stem.replace(".", "_")
    if "." in name or not name:
        raise LoRAError(f"LoRA name {name!r} is empty or holds a '.': rename the file or give another name")
    targets = lora_targets(model)
    for module, f in factors.items():
        if module not in targets:
            raise LoRAError(f"LoRA '{name}': the model has no layer '{module}' — the LoRA is for a different model")
        base = targets[module]
        fit_factors(base.base if isinstance(base, LoRALayer) else base, f, f"{name}:{module}")
    for module, f in factors.items():
        layer = wrap(model, module)
        if name in layer.downs:
            layer.remove(name)
        layer.add(name, f, weight, dtype)
    return name


def loaded_loras(model: nn.Module) -> dict[str, float]:
    """LoRA name -> current weight."""
    return {n: w for m in model.modules() if isinstance(m, LoRALayer) for n, w in m.weights.items()}


def set_lora_weights(model: nn.Module, weights: dict[str, float]) -> None:
    for m in model.modules():
        if isinstance(m, LoRALayer):
            for n, w in weights.items():
                if n in m.weights:
                    m.weights[n] = w


def remove_lora(model: nn.Module, name: str) -> None:
    for m in model.modules():
        if isinstance(m, LoRALayer) and name in m.downs:
            m.remove(name)


def lora_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """LoRA `name` in the diffusers/PEFT layout ("<module>.lora_A.weight", ".lora_B.weight", ".alpha")."""
    out = {}
    for module, m in lora_targets(model).items():
        if isinstance(m, LoRALayer) and name in m.downs:
            out[f"{module}.lora_A.weight"] = m.downs[name].detach().to(torch.bfloat16).cpu().contiguous()
            out[f"{module}.lora_B.weight"] = m.ups[name].detach().to(torch.bfloat16).cpu().contiguous()
            out[f"{module}.alpha"] = torch.tensor(m.scales[name] * m.downs[name].shape[0])
    return out


def save_lora(model: nn.Module, name: str, path: str | os.PathLike[str]) -> None:
    """Write LoRA `name` as a .safetensors file (atomically)."""
    atomic_write(path, lambda tmp: save_file(lora_state_dict(model, name), tmp, metadata={"format": "pt", "bonsai_lora": name}))


def parse_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """"a cat <lora:ink:0.8>" -> ("a cat", [("ink", 0.8)]). A missing weight means 1.0."""
    loras = []
    for m in _PROMPT_LORA.finditer(prompt):
        try:
            weight = float(m.group(2)) if m.group(2) else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):  # float() reads "nan" and "inf" too, which turn every pixel black
            raise LoRAError(f"bad LoRA weight in '{m.group(0)}': write <lora:NAME:0.8>")
        loras.append((m.group(1).strip(), weight))
    return " ".join(_PROMPT_LORA.sub(" ", prompt).split()), loras


def resolve_lora(name: str, lora_dir: str | os.PathLike[str] | None) -> Path:
    """A prompt's LoRA name -> its file NAME.safetensors in `lora_dir`. A name is a file name there, never a
    path: prompts may come from a server's clients."""
    if name != Path(name).name or "\\" in name:
        raise LoRAError(f"LoRA '{name}': a LoRA is named by its file name in the LoRA folder, not by a path")
    if lora_dir is not None and (Path(lora_dir) / f"{name}.safetensors").is_file():
        return Path(lora_dir) / f"{name}.safetensors"
    raise LoRAError(f"LoRA '{name}' not found: put {name}.safetensors in {lora_dir or 'a LoRA folder (--lora-dir)'}")


def use_prompt_loras(model: nn.Module, loras: list[tuple[str, float]], lora_dir: str | os.PathLike[str] | None) -> dict[str, float]:
    """Activate a prompt's `<lora:name:w>` LoRAs at their weights, loading missing ones from `lora_dir`;
    every other LoRA keeps its weight. Returns the weights that undo this with set_lora_weights: each
    named LoRA's earlier weight, 0 for one this call loaded (it stays loaded, switched off, for reuse).

    Prompt tags thus act for one generation only and never switch off a LoRA attached through the
    API; a tag naming an attached LoRA overrides its weight for that generation."""
    named = [(_loaded_name(tag, lora_dir), tag, weight) for tag, weight in loras]  # one look at the folder per tag
    tag_of = {name: tag for name, tag, _ in named}
    wanted = {name: weight for name, _, weight in named}
    before = loaded_loras(model)
    for name in wanted.keys() - before.keys():  # load all first: a missing one leaves every weight as it was
        apply_lora(model, resolve_lora(tag_of[name], lora_dir), 0.0, name=name)
    set_lora_weights(model, wanted)
    return {name: before.get(name, 0.0) for name in wanted}


def _loaded_name(tag: str, lora_dir: str | os.PathLike[str] | None) -> str:
    """The name a tag's LoRA is loaded under: the tag with '.' as '_' (a '.' cannot name a parameter), as
    apply_lora names a file's LoRA, so that files like "detail_v1.5.safetensors" can be tagged."""
    name = tag.replace(".", "_")
    if name != tag and lora_dir is not None and all((Path(lora_dir) / f"{n}.safetensors").is_file() for n in (tag, name)):
        raise LoRAError(f"LoRA '{tag}': {tag}.safetensors and {name}.safetensors in {lora_dir} would load under one name; rename one")
    return name


__all__ = [
    "LoRAError", "LoRAFactors", "LoRALayer", "add_trainable_lora", "apply_lora", "loaded_loras", "lora_state_dict",
    "lora_targets", "parse_lora", "parse_prompt_loras", "read_lora", "remove_lora", "resolve_lora", "save_lora",
    "set_lora_weights", "use_prompt_loras",
]
