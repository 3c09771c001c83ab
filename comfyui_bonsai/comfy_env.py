"""What the nodes need from ComfyUI, in one place, each piece optional.

Outside ComfyUI (tests, plain Python) `folder_paths` and `comfy` do not exist: model lists then
hold only the Bonsai store, the device is Bonsai's own choice, and there is no progress bar.
Imports happen at call time, so a stub `folder_paths` put in sys.modules by a test is seen.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

# ComfyUI model folders searched for Bonsai checkpoints ("unet" is ComfyUI's legacy name for
# diffusion_models; recent versions map one onto the other, older ones keep both).
MODEL_FOLDERS = ("diffusion_models", "unet", "checkpoints")
LORA_FOLDER = "loras"


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def folder_files(folders: tuple[str, ...], suffix: str = ".safetensors") -> list[tuple[str, Path]]:
    """(name as ComfyUI lists it, full path) for every `suffix` file of `folders`, each file once."""
    fp = _optional("folder_paths")
    if fp is None:
        return []
    seen: set[Path] = set()
    out = []
    for folder in folders:
        try:
            names = fp.get_filename_list(folder)
        except KeyError:  # a folder this ComfyUI version does not know
            continue
        for name in names:
            full = fp.get_full_path(folder, name)
            if full is None or not name.endswith(suffix):
                continue
            path = Path(full).resolve()
            if path not in seen:
                seen.add(path)
                out.append((name, path))
    return out


def torch_device() -> str:
    """ComfyUI's compute device (it honours --cpu), or "auto" outside ComfyUI."""
    mm = _optional("comfy.model_management")
    return str(mm.get_torch_device()) if mm is not None else "auto"


def step_hook(total: int) -> Callable[[int], None]:
    """A per-step callback: advances ComfyUI's progress bar and stops when the user cancels."""
    mm = _optional("comfy.model_management")
    utils = _optional("comfy.utils")
    bar = utils.ProgressBar(total) if utils is not None else None

    def hook(step: int) -> None:
        if mm is not None:
            mm.throw_exception_if_processing_interrupted()
        if bar is not None:
            bar.update_absolute(step, total)

    return hook


def intermediate_device() -> torch.device:
    """Where ComfyUI keeps latents between nodes (the CPU outside ComfyUI)."""
    mm = _optional("comfy.model_management")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")
