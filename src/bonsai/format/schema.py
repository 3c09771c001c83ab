"""The Bonsai metadata document and the tensors it implies.

A checkpoint is one safetensors file. Its header's `__metadata__` maps "bonsai" to a JSON
document:

    {"format": "bonsai", "format_version": 1, "architecture": "dit", "config": {...},
     "quantization": {"layers": {"<module path>": {"scheme": "onebit", "in_features": K,
         "out_features": N, "group_size": G, "rank": r,
         "col_scale": bool, "row_offset": bool, "bias": bool}}, ...},
     "provenance": {...}, "license": "Apache-2.0", "name": ..., "description": ...}

A packed 1-bit layer at module path P is stored as flat tensors (see bonsai.kernels.packed):
P.signs uint8 [N, ceil(K/8)], P.row_scale f32 [N], and when the layer spec says so
P.group_scale f16 [N, ceil(K/G)], P.col_scale f32 [K], P.row_offset f32 [N],
P.lowrank_u bf16 [N, r], P.lowrank_v bf16 [r, K], P.bias (any float dtype) [N].
Every other tensor is high precision and keeps its dtype.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bonsai.kernels.packed import GROUP_SCALE_DTYPE, LOWRANK_DTYPE, SCALE_DTYPE, PackedWeight
from bonsai.kernels.packing import packed_width

from .errors import CheckpointError

FORMAT_NAME = "bonsai"
FORMAT_VERSION = 1
METADATA_KEY = "bonsai"  # key in the safetensors __metadata__ holding the JSON document
# Tensors of a packed layer whose values must be finite (a NaN scale or low-rank factor silently ruins
# every output); all are small next to the signs, so checking them on load is cheap.
FINITE_SUFFIXES = ("row_scale", "group_scale", "col_scale", "row_offset", "lowrank_u", "lowrank_v")

# (dtype or None for "any floating dtype", shape)
TensorSpec = tuple[torch.dtype | None, tuple[int, ...]]

_REQUIRED: dict[str, type] = {
    "format": str,
    "format_version": int,
    "architecture": str,
    "config": dict,
    "quantization": dict,
    "provenance": dict,
    "license": str,
}
_OPTIONAL: dict[str, type] = {"name": str, "description": str}


@dataclass(frozen=True)
class LayerSpec:
    """What quantization.layers[P] says about packed layer P (K = in_features, N = out_features)."""

    scheme: str
    in_features: int
    out_features: int
    group_size: int = 0
    rank: int = 0
    col_scale: bool = False
    row_offset: bool = False
    bias: bool = False

    @classmethod
    def of(cls, weight: PackedWeight, scheme: str, bias: bool = False) -> LayerSpec:
        """The spec describing `weight` exactly (use it when writing a checkpoint)."""
        return cls(
            scheme=scheme,
            in_features=weight.in_features,
            out_features=weight.out_features,
            group_size=weight.group_size,
            rank=weight.rank,
            col_scale=weight.col_scale is not None,
            row_offset=weight.row_offset is not None,
            bias=bias,
        )

    @classmethod
    def from_json(cls, module: str, entry: Any, path: str | os.PathLike[str]) -> LayerSpec:
        where = f"quantization.layers['{module}']"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} must be an object, got {type(entry).__name__}", path)
        unknown = sorted(set(entry) - set(cls.__dataclass_fields__))
        if unknown:
            raise CheckpointError(f"{where} has unknown fields {unknown}", path, "fix the metadata")
        if not isinstance(entry.get("scheme"), str) or not entry["scheme"]:
            raise CheckpointError(f"{where}.scheme must be a non-empty string", path, "fix the metadata")
        for key, least in (("in_features", 1), ("out_features", 1), ("group_size", 0), ("rank", 0)):
            value = entry.get(key)
            if type(value) is not int or value < least:
                raise CheckpointError(
                    f"{where}.{key} must be an integer >= {least}, got {value!r}", path, "fix the metadata"
                )
        for key in ("col_scale", "row_offset", "bias"):
            if type(entry.get(key, False)) is not bool:
                raise CheckpointError(
                    f"{where}.{key} must be true or false, got {entry[key]!r}", path, "fix the metadata"
                )
        return cls(**entry)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def expected_tensors(self, module: str) -> dict[str, TensorSpec]:
        """Name -> (dtype, shape) of every tensor of this layer stored under `module`."""
        n, k = self.out_features, self.in_features
        out: dict[str, TensorSpec] = {
            f"{module}.signs": (torch.uint8, (n, packed_width(k))),
            f"{module}.row_scale": (SCALE_DTYPE, (n,)),
        }
        if self.group_size:
            out[f"{module}.group_scale"] = (GROUP_SCALE_DTYPE, (n, -(-k // self.group_size)))
        if self.col_scale:
            out[f"{module}.col_scale"] = (SCALE_DTYPE, (k,))
        if self.row_offset:
            out[f"{module}.row_offset"] = (SCALE_DTYPE, (n,))
        if self.rank:
            out[f"{module}.lowrank_u"] = (LOWRANK_DTYPE, (n, self.rank))
            out[f"{module}.lowrank_v"] = (LOWRANK_DTYPE, (self.rank, k))
        if self.bias:
            out[f"{module}.bias"] = (None, (n,))
        return out


def flatten_layer(module: str, weight: PackedWeight, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The flat tensors of a packed layer under `module`, as a checkpoint stores them."""
    out = {f"{module}.{name}": t for name, t in weight.tensors().items()}
    if bias is not None:
        out[f"{module}.bias"] = bias
    return out


def check_version(meta: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Reject documents of another format or an unsupported version, naming what was found."""
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"metadata format is {meta.get('format')!r}, expected {FORMAT_NAME!r}",
            path,
            "this is not a Bonsai checkpoint",
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:
        newer = type(version) is int and version > FORMAT_VERSION
        raise CheckpointError(
            f"format version {version!r} is not supported (this Bonsai reads format version {FORMAT_VERSION})",
            path,
            "upgrade Bonsai" if newer else "re-convert the model with this version of Bonsai",
        )


def validate_metadata(meta: Any, path: str | os.PathLike[str]) -> dict[str, LayerSpec]:
    """Check the Bonsai metadata document; return its packed layers by module path."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"Bonsai metadata must be a JSON object, got {type(meta).__name__}", path)
    check_version(meta, path)
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in meta:
            if key in _REQUIRED:
                raise CheckpointError(
                    f"Bonsai metadata lacks the required field '{key}'", path, "add it and save again"
                )
        elif not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CheckpointError(
                f"metadata field '{key}' must be {kind.__name__}, got {type(meta[key]).__name__}",
                path,
                "fix the metadata",
            )
    if not meta["architecture"]:
        raise CheckpointError(
            "metadata field 'architecture' is empty", path, "name the model architecture (e.g. 'dit')"
        )
    layers = meta["quantization"].get("layers")
    if not isinstance(layers, dict):
        raise CheckpointError(
            "metadata field 'quantization.layers' must be an object of module path -> layer spec", path
        )
    return {module: LayerSpec.from_json(module, entry, path) for module, entry in layers.items()}
