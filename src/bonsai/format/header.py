"""Strict reading of a safetensors header, before any byte of it reaches safetensors.

Layout of a safetensors file: 8 bytes little-endian header length H, H bytes of JSON
({"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}),
then the data section; offsets are relative to its start and tile it with no gap or overlap.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CheckpointError
from .schema import METADATA_KEY, LayerSpec, validate_metadata

MAX_HEADER_BYTES = 64 * 1024 * 1024  # a real header is kilobytes; refuse to parse a hostile one

_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; offsets are relative to the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass(frozen=True)
class Header:
    """A checked header: the Bonsai metadata document, its packed layers and every tensor."""

    path: str
    metadata: dict[str, Any]
    layers: dict[str, LayerSpec]
    tensors: dict[str, TensorInfo]
    header_size: int  # H, the JSON length in bytes
    file_size: int
    extra_metadata: dict[str, str] = field(default_factory=dict)  # other __metadata__ entries

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def _fail(path: str, problem: str, fix: str | None = None) -> CheckpointError:
    return CheckpointError(problem, path, fix)


def _parse_tensor(path: str, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"header entry of tensor '{name}' must have exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise _fail(path, f"tensor '{name}' has unsupported dtype {entry['dtype']!r} (supported: {', '.join(DTYPES)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise _fail(path, f"tensor '{name}' has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(type(o) is not int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(path, f"tensor '{name}' has invalid data_offsets {offsets!r}")
    info = TensorInfo(dtype, tuple(shape), (offsets[0], offsets[1]))
    if info.nbytes != info.numel * dtype.itemsize:
        raise _fail(
            path,
            f"tensor '{name}' spans {info.nbytes} bytes, but {entry['dtype']} {shape} "
            f"needs {info.numel * dtype.itemsize}",
        )
    return info


def _check_layout(path: str, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Offsets must lie inside the file and tile the data section exactly."""
    position, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: item[1].data_offsets):
        begin, end = info.data_offsets
        if end > data_size:
            raise _fail(
                path,
                f"file is truncated: tensor '{name}' ends at data byte {end}, "
                f"but the data section has {data_size} bytes",
                "download or copy the file again",
            )
        if begin < position:
            raise _fail(path, f"tensors '{previous}' and '{name}' overlap (data bytes {begin}..{position})")
        if begin > position:
            raise _fail(path, f"unused gap in the data section before tensor '{name}' (data bytes {position}..{begin})")
        position, previous = end, name
    if position != data_size:
        raise _fail(
            path, f"{data_size - position} bytes after the last tensor: the file is corrupt or has trailing data"
        )


def _read_raw(path: str) -> tuple[int, int, bytes]:
    """(file size, header length, header bytes), with the length checked before reading."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"file is truncated: {size} bytes, too short for a safetensors header")
            length = int.from_bytes(prefix, "little")
            if (length > MAX_HEADER_BYTES or 8 + length > size) and _is_pickle(prefix):
                raise _fail(
                    path,
                    "a PyTorch pickle file (.ckpt/.pt/.bin), not safetensors",
                    "Bonsai never loads pickle files (they can run code): save the weights as .safetensors, "
                    "then convert them with 'bonsai quantize'",
                )
            if length > MAX_HEADER_BYTES:
                raise _fail(
                    path,
                    f"header too large: {length} bytes claimed, the limit is {MAX_HEADER_BYTES}",
                    "the file is corrupt or not a checkpoint",
                )
            if 8 + length > size:
                raise _fail(
                    path,
                    f"file is truncated: header claims {length} bytes but only {size - 8} follow",
                    "download or copy the file again",
                )
            return size, length, f.read(length)
    except FileNotFoundError:
        raise _fail(path, "file not found") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise _fail(path, "permission denied") from None


def _is_pickle(prefix: bytes) -> bool:
    """Whether a file's first bytes are those of torch.save (a zip archive) or of a plain pickle (protocol 2-5).
    Asked only of a file whose safetensors header length is impossible: a real length may start with 0x80."""
    return prefix.startswith(b"PK\x03\x04") or (prefix[0] == 0x80 and 2 <= prefix[1] <= 5)


def _strict_json(text: str | bytes) -> Any:
    """json.loads that rejects duplicate keys and NaN/Infinity, which other readers treat differently."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        counts = Counter(key for key, _ in items)
        if len(counts) != len(items):
            raise ValueError(f"duplicate keys {sorted(key for key, n in counts.items() if n > 1)}")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


@dataclass(frozen=True)
class Layout:
    """A checked safetensors header of any file (Bonsai or not): its tensors and __metadata__."""

    path: str
    tensors: dict[str, TensorInfo]
    raw_metadata: dict[str, str]
    header_size: int  # H, the JSON length in bytes
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def read_layout(path: str | os.PathLike[str]) -> Layout:
    """Read and check a safetensors header (size limit, strict JSON, every tensor entry, offsets
    tiling the data section); no tensor data is read."""
    path = os.fspath(path)
    size, length, raw = _read_raw(path)
    try:
        doc = _strict_json(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _fail(path, f"header is not valid JSON ({e})", "the file is corrupt or not a safetensors file") from None
    if not isinstance(doc, dict):
        raise _fail(path, f"header must be a JSON object, got {type(doc).__name__}")
    raw_meta = doc.pop("__metadata__", None)
    raw_meta = {} if raw_meta is None else raw_meta  # null is allowed; [], 0 or "" is not a metadata map
    if not isinstance(raw_meta, dict) or not all(isinstance(v, str) for v in raw_meta.values()):
        raise _fail(path, "header __metadata__ must map strings to strings")
    tensors = {name: _parse_tensor(path, name, entry) for name, entry in doc.items()}
    _check_layout(path, tensors, size - 8 - length)
    return Layout(path, tensors, raw_meta, length, size)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and check the header of a Bonsai checkpoint; no tensor data is read."""
    layout = read_layout(path)
    path, raw_meta = layout.path, dict(layout.raw_metadata)
    if METADATA_KEY not in raw_meta:
        raise _fail(
            path,
            f"not a Bonsai checkpoint (the safetensors metadata has no '{METADATA_KEY}' entry)",
            "convert the model to a Bonsai checkpoint first",
        )
    try:
        metadata = _strict_json(raw_meta.pop(METADATA_KEY))
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"the '{METADATA_KEY}' metadata entry is not valid JSON ({e})") from None
    layers = validate_metadata(metadata, path)
    return Header(path, metadata, layers, layout.tensors, layout.header_size, layout.file_size, raw_meta)
