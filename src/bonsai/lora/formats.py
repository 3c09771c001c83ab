"""LoRA files -> per-module low-rank factors, for the diffusers/PEFT and kohya/A1111 key layouts.

    diffusers / PEFT: "<prefix>.<module>.lora_A.weight" [r, K], ".lora_B.weight" [N, r]
                      (also ".lora.down.weight" / ".lora.up.weight"); optional "<module>.alpha"
    kohya / A1111:    "lora_unet_<module with _ for .>.lora_down.weight", ".lora_up.weight", ".alpha"
                      ("lora_transformer_" for DiTs; "lora_te*" text-encoder keys are reported, not applied)

Conv LoRAs carry 4-D factors: down [r, I, kh, kw], up [N, r, 1, 1]. The effective update is
delta W = (alpha / r) * up @ down (alpha defaults to r, i.e. scale 1).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

_PEFT = re.compile(r"^(?P<module>.+?)\.(?:lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)\.weight$")
_KOHYA = re.compile(r"^lora_(?:unet|transformer)_(?P<module>.+?)\.(?:lora_down|lora_up|alpha)(?:\.weight)?$")
_PREFIXES = ("unet.", "transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "")


class LoRAError(ValueError):
    """A LoRA file that cannot be applied; the message names the file, key or module."""


@dataclass(frozen=True)
class LoRAFactors:
    down: torch.Tensor  # [r, K] or [r, I, kh, kw]
    up: torch.Tensor  # [N, r] or [N, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _is_down(key: str) -> bool:
    return any(s in key for s in ("lora_A", "lora.down", "lora_down"))


def _group(state: dict[str, torch.Tensor], modules: set[str], source: str) -> dict[str, dict[str, torch.Tensor]]:
    by_underscore = {m.replace(".", "_"): m for m in modules}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    for key, t in state.items():
        if key.startswith(("lora_te", "text_encoder", "te_")):
            continue  # text-encoder LoRAs: Bonsai's text encoders are not LoRA targets
        module = part = None
        kohya = _KOHYA.match(key)
        if kohya:
            module = by_underscore.get(kohya.group("module"))
            part = "alpha" if key.endswith(".alpha") else ("down" if _is_down(key) else "up")
        elif key.endswith(".alpha"):
            module, part = _strip(key.removesuffix(".alpha"), modules), "alpha"
        elif (peft := _PEFT.match(key)) is not None:
            module, part = _strip(peft.group("module"), modules), ("down" if _is_down(key) else "up")
        if module is None:
            unmatched.append(key)
            continue
        groups.setdefault(module, {})[part] = t
    if unmatched:
        raise LoRAError(
            f"{source}: {len(unmatched)} LoRA tensor(s) match no layer of this model, e.g. '{unmatched[0]}' — "
            "the LoRA is for a different model (or an unsupported key layout)"
        )
    return groups


def _strip(name: str, modules: set[str]) -> str | None:
    for prefix in _PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in modules:
            return name[len(prefix):]
    return None


def _factor_problem(down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None) -> str | None:
    """Why these tensors cannot be one layer's LoRA, or None. Non-finite values would make every image NaN."""
    for part, t in (("down", down), ("up", up)):
        if t.ndim not in (2, 4) or 0 in t.shape or not t.is_floating_point():
            return f"has {part} {t.dtype} {tuple(t.shape)} (expected a float matrix, or a 4-D conv factor, with no empty side)"
    if up.shape[1] != down.shape[0]:
        return f"has down {tuple(down.shape)} and up {tuple(up.shape)} of different rank"
    if alpha is not None and alpha.numel() != 1:
        return f"has alpha of shape {tuple(alpha.shape)} (expected one number)"
    for part, t in (("down", down), ("up", up), ("alpha", alpha)):
        if t is not None and not bool(torch.isfinite(t).all()):
            return f"has non-finite values in its {part}"
    return None


def parse_lora(state: dict[str, torch.Tensor], modules: set[str], source: str = "<LoRA>") -> dict[str, LoRAFactors]:
    """Module name -> factors, for the modules of a model named in `modules`."""
    out = {}
    for module, parts in _group(state, modules, source).items():
        if "down" not in parts or "up" not in parts:
            raise LoRAError(f"{source}: layer '{module}' has only {', '.join(sorted(parts))} (needs both down/A and up/B)")
        down, up = parts["down"], parts["up"]
        problem = _factor_problem(down, up, parts.get("alpha"))
        if problem is not None:
            raise LoRAError(f"{source}: layer '{module}' {problem}")
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        out[module] = LoRAFactors(down, up, alpha)
    if not out:
        raise LoRAError(f"{source}: no LoRA layers found")
    return out


def read_lora(path: str | os.PathLike[str], modules: set[str]) -> dict[str, LoRAFactors]:
    """Read a .safetensors LoRA file (no pickle) for a model whose module names are `modules`."""
    if not os.path.isfile(path):
        raise LoRAError(f"LoRA file {path} does not exist")
    try:
        state = load_file(os.fspath(path))
    except Exception as e:
        raise LoRAError(f"{path} is not a readable safetensors file ({e})") from None
    return parse_lora(state, modules, os.fspath(path))
