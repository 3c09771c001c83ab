"""Where the weights of a model to convert come from, read one tensor at a time.

A source is one of:
- a diffusers pipeline folder (model_index.json): its unet/ or transformer/ component is used;
- a diffusers component folder: config.json + diffusion_pytorch_model*.safetensors (sharded or not);
- a single-file checkpoint in the original (A1111 / ComfyUI) key layout, with `config` naming a
  diffusers folder or config.json of the same model (the hub is not consulted);
- a single file in diffusers' own key layout (a component's weights away from their folder), with `config`.

For single files the key layout is translated with diffusers' own conversion functions, run on
meta tensors: where the translation is a pure renaming (SD 1.x/2.x/XL UNets) the tensors are
still read one at a time; where it merges or splits tensors (e.g. FLUX fused qkv) the file is
converted whole, which needs about its size in memory.

Tensors are read with plain file reads, not through a memory map: every page of a mapped file
that has been touched counts in the process's resident set until the map is closed, so reading
a whole model through one would make peak RSS the size of the source file however little of it
is still in use.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..format import CheckpointError
from ..format.header import METADATA_KEY, read_layout
from .adapters import ADAPTERS, Adapter, UnsupportedModel, adapter_for

WEIGHTS = "diffusion_pytorch_model"
LDM_UNET_PREFIX = "model.diffusion_model."
# diffusers' infer_diffusers_model_type -> model class of the denoiser in that checkpoint
_SINGLE_FILE_CLASSES = {
    "v1": "UNet2DConditionModel", "v2": "UNet2DConditionModel", "xl_base": "UNet2DConditionModel",
    "xl_refiner": "UNet2DConditionModel", "xl_inpaint": "UNet2DConditionModel", "inpainting": "UNet2DConditionModel",
    "inpainting_v2": "UNet2DConditionModel", "playground-v2-5": "UNet2DConditionModel",
    "sd3": "SD3Transformer2DModel", "sd35_large": "SD3Transformer2DModel", "sd35_medium": "SD3Transformer2DModel",
    "flux-dev": "FluxTransformer2DModel", "flux-schnell": "FluxTransformer2DModel", "flux-fill": "FluxTransformer2DModel",
    "flux-depth": "FluxTransformer2DModel",
    "sana": "SanaTransformer2DModel",
}


class SourceError(ValueError):
    """A source that cannot be read; the message names the path and what to do."""


class TensorFile:
    """One .safetensors file, read a tensor at a time with plain reads (no memory map: mapped
    pages a conversion has read stay in its RSS). The header is checked by bonsai.format."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.layout = read_layout(path)
            self._file = open(path, "rb")  # noqa: SIM115 -- kept open for the reads that follow; closed with the object
        except (CheckpointError, OSError) as e:
            raise SourceError(f"{path} is not a readable safetensors file ({e})") from None

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype and shape, in newly allocated memory."""
        info = self.layout.tensors.get(name)
        if info is None:
            raise SourceError(f"{self.path}: header entry of tensor '{name}' is missing")
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            view = out.reshape(-1).view(torch.uint8).numpy()
            self._file.seek(self.layout.data_start + info.data_offsets[0])
            if self._file.readinto(memoryview(view)) != info.nbytes:
                raise SourceError(f"{self.path}: file is truncated inside tensor '{name}'")
        return out


@dataclass
class Source:
    """A model to convert: its adapter, config, and a map from diffusers state-dict keys to
    (file, key in file). `get` reads one tensor; `tensors` holds pre-converted ones (whole-file path)."""

    adapter: Adapter
    config: dict
    path: Path
    pipeline_dir: Path | None
    keys: dict[str, tuple[Path, str]]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _files: dict[Path, TensorFile] = field(default_factory=dict, repr=False)

    def __contains__(self, key: str) -> bool:
        return key in self.keys or key in self.tensors

    def get(self, key: str) -> torch.Tensor:
        if key in self.tensors:
            return self.tensors.pop(key)
        if key not in self.keys:
            raise SourceError(f"{self.path}: no tensor for '{key}' (the weights do not match the config)")
        file, name = self.keys[key]
        if file not in self._files:
            self._files[file] = TensorFile(file)
        return self._files[file].read(name)

    def source_bytes(self) -> int:
        """Bytes of the weight files read (a single file converted whole has no per-key files: itself)."""
        files = {f for f, _ in self.keys.values()} or ({self.path} if self.path.is_file() else set())
        return sum(f.stat().st_size for f in files)


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{path} must hold a JSON object, not a {type(doc).__name__}")
    return doc


def _component_dir(pipeline_dir: Path) -> Path:
    index = _read_json(pipeline_dir / "model_index.json")
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[1] in ADAPTERS:
            return pipeline_dir / name
    classes = sorted({e[1] for e in index.values() if isinstance(e, list) and len(e) == 2 and e[1]})
    raise UnsupportedModel(
        f"{pipeline_dir / 'model_index.json'}: no supported denoiser among {', '.join(classes)}; "
        f"Bonsai converts {', '.join(sorted(ADAPTERS))}"
    )


def _weight_files(folder: Path) -> list[Path]:
    index = folder / f"{WEIGHTS}.safetensors.index.json"
    if index.exists():
        shards = _read_json(index).get("weight_map", {})
        if not isinstance(shards, dict) or not all(isinstance(f, str) and f == Path(f).name for f in shards.values()):
            raise SourceError(f"{index}: weight_map must map tensor names to file names in {folder}")
        return sorted({folder / f for f in shards.values()})
    plain = folder / f"{WEIGHTS}.safetensors"
    if plain.exists():
        return [plain]
    variants = sorted(folder.glob(f"{WEIGHTS}*.safetensors"))
    if variants:
        return variants[:1]
    if any(folder.glob(f"{WEIGHTS}*.bin")):
        raise SourceError(f"{folder}: only .bin (pickle) weights found; Bonsai reads .safetensors only — convert them first")
    raise SourceError(f"{folder}: no {WEIGHTS}*.safetensors weights found")


def _keys_of(files: list[Path]) -> dict[str, tuple[Path, str]]:
    keys = {}
    for f in files:
        try:
            with safe_open(os.fspath(f), framework="pt", device="cpu") as h:
                keys.update({k: (f, k) for k in h.keys()})
        except FileNotFoundError:
            raise SourceError(f"{f} is missing (listed in the shard index)") from None
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise SourceError(f"{f} is not a readable safetensors file ({e})") from None
    return keys


def _config_of(folder: Path) -> tuple[Adapter, dict]:
    config = _read_json(folder / "config.json")
    return adapter_for(str(config.get("_class_name", "")), str(folder / "config.json")), config


def open_folder(path: Path) -> Source:
    pipeline_dir = path if (path / "model_index.json").exists() else None
    folder = _component_dir(path) if pipeline_dir else path
    adapter, config = _config_of(folder)
    return Source(adapter, config, folder, pipeline_dir, _keys_of(_weight_files(folder)))


def _meta_checkpoint(file: Path) -> dict[str, torch.Tensor]:
    """key -> meta tensor of the stored shape and dtype (no data read)."""
    out = {}
    with safe_open(os.fspath(file), framework="pt", device="cpu") as h:
        for k in h.keys():
            s = h.get_slice(k)
            out[k] = torch.empty(s.get_shape(), dtype=_DTYPES.get(s.get_dtype(), torch.float32), device="meta")
    return out


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _config_for_single_file(config: Path | None, file: Path, class_name: str) -> tuple[Path | None, dict]:
    if config is None:
        raise SourceError(
            f"{file}: a single-file {class_name} checkpoint needs its diffusers config: pass --config with a "
            "diffusers folder (pipeline or component) or config.json of the same model"
        )
    if config.is_file():
        return None, _read_json(config)
    pipeline_dir = config if (config / "model_index.json").exists() else None
    folder = _component_dir(config) if pipeline_dir else config
    return pipeline_dir, _read_json(folder / "config.json")


def _folder_to_pass(file: Path) -> Path | None:
    """For weights in diffusers' own key layout: the component folder they came from (the pipeline folder
    above it, if any), or None where no config.json lies beside them."""
    if not (file.parent / "config.json").exists():
        return None
    return file.parent.parent if (file.parent.parent / "model_index.json").exists() else file.parent


def open_single_file(file: Path, config: Path | None) -> Source:
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        meta = _meta_checkpoint(file)
    except Exception as e:
        raise SourceError(f"{file} is not a readable safetensors file ({e})") from None
    if METADATA_KEY in read_layout(file).raw_metadata:
        raise SourceError(f"{file} is a Bonsai checkpoint already: bonsai quantize converts full-precision models")
    if any(k.endswith((".scale_weight", "scaled_fp8")) for k in meta):
        # ComfyUI's "fp8 scaled" files: weight = stored fp8 x scale_weight; diffusers' translation drops the scales
        raise SourceError(f"{file} holds scaled fp8 weights (ComfyUI's fp8_scaled), which Bonsai does not read: convert the fp16/bf16 file")
    bare_unet = not any(k.startswith(LDM_UNET_PREFIX) for k in meta) and any(k.startswith("input_blocks.") for k in meta)
    if bare_unet:  # a UNet without its pipeline (ComfyUI models/unet): add the prefix the converter expects
        meta = {LDM_UNET_PREFIX + k: v for k, v in meta.items()}
    stored = {id(t): k for k, t in meta.items()}
    model_type = infer_diffusers_model_type(meta)
    unrecognized = model_type == "v1" and not bare_unet and not any(k.startswith(LDM_UNET_PREFIX) for k in meta)  # diffusers' fallback
    if unrecognized and (folder := _folder_to_pass(file)):
        raise SourceError(f"{file} holds a diffusers component's weights, not a single-file checkpoint: pass the folder {folder} instead")
    if unrecognized:  # no single-file layout diffusers knows: weights in diffusers' own key layout, away from their folder?
        if config is None:
            raise SourceError(
                f"{file}: not a single-file checkpoint layout Bonsai recognizes (SD 1.x/2.x/XL, SD3, FLUX.1, Sana); "
                "if it holds a diffusers model's weights, pass --config with that model's folder or config.json"
            )
        pipeline_dir, cfg = _config_for_single_file(config, file, "diffusers")
        adapter = adapter_for(str(cfg.get("_class_name", "")), str(config))
        return Source(adapter, cfg, file, pipeline_dir, {k: (file, k) for k in meta})
    class_name = _SINGLE_FILE_CLASSES.get(model_type)
    if class_name is None:
        raise UnsupportedModel(f"{file}: checkpoint type {model_type!r} is not one Bonsai converts")
    adapter = adapter_for(class_name, str(file))
    pipeline_dir, cfg = _config_for_single_file(config, file, class_name)
    if cfg.get("_class_name", class_name) != class_name:
        raise SourceError(f"{config}: config is for {cfg['_class_name']}, but {file} holds a {class_name}")
    mapping = SINGLE_FILE_LOADABLE_CLASSES[class_name]["checkpoint_mapping_fn"]

    def convert(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' key translation; it fails on keys the config does not lead it to expect."""
        try:
            return mapping(checkpoint=checkpoint, config=cfg)
        except (KeyError, IndexError, ValueError, RuntimeError) as e:
            raise SourceError(
                f"{file}: its tensors do not match the config from {config} ({type(e).__name__}: {e}); "
                f"pass --config of the same model (a {model_type!r} checkpoint)"
            ) from None

    converted = convert(dict(meta))
    renamed = {k: stored.get(id(t)) for k, t in converted.items()}
    if all(v is not None for v in renamed.values()):
        keys = {k: (file, v.removeprefix(LDM_UNET_PREFIX) if bare_unet else v) for k, v in renamed.items()}
        return Source(adapter, cfg, file, pipeline_dir, keys)
    warnings.warn(f"{file}: this layout merges or splits tensors; converting it whole (memory ~ file size)", stacklevel=2)
    from safetensors.torch import load_file

    full = load_file(os.fspath(file))
    if bare_unet:
        full = {LDM_UNET_PREFIX + k: v for k, v in full.items()}
    return Source(adapter, cfg, file, pipeline_dir, {}, tensors=dict(convert(full)))


def open_source(src: str | os.PathLike[str], config: str | os.PathLike[str] | None = None) -> Source:
    """Open a diffusers folder or a single-file checkpoint for conversion."""
    path = Path(src)
    if path.is_dir():
        return open_folder(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SourceError(f"{path}: only .safetensors checkpoints are read (no pickle); convert .ckpt/.pt files first")
        return open_single_file(path, None if config is None else Path(config))
    raise SourceError(f"{path} does not exist: pass a diffusers model folder or a .safetensors checkpoint")
