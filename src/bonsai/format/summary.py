"""What a checkpoint holds and what it costs, from its header alone (no tensor data is read)."""

from __future__ import annotations

import os
from typing import Any

from .header import read_header


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Identity, sizes and bits per weight of a checkpoint, as plain JSON-ready values.

    Logical parameters: N*K for a packed layer (plus its bias, counted as high precision),
    numel for every other tensor. Bits per weight: file bytes * 8 / logical parameters overall;
    for the 1-bit layers, the bytes of their signs, scales, offsets and low-rank factors * 8 / sum N*K.
    """
    header = read_header(path)
    meta = header.metadata
    packed_bytes = params_1bit = 0
    packed_names: set[str] = set()
    schemes: dict[str, dict[str, int]] = {}
    for module, spec in header.layers.items():
        names = [n for n in spec.expected_tensors(module) if not n.endswith(".bias")]
        packed_names.update(names)
        packed_bytes += sum(header.tensors[n].nbytes for n in names)
        params = spec.out_features * spec.in_features
        params_1bit += params
        entry = schemes.setdefault(spec.scheme, {"layers": 0, "parameters": 0})
        entry["layers"] += 1
        entry["parameters"] += params

    others = {name: info for name, info in header.tensors.items() if name not in packed_names}
    params_hp = sum(info.numel for info in others.values())
    bytes_hp = sum(info.nbytes for info in others.values())
    total = params_1bit + params_hp

    dtypes: dict[str, dict[str, int]] = {}
    for info in header.tensors.values():
        entry = dtypes.setdefault(str(info.dtype).removeprefix("torch."), {"tensors": 0, "elements": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["elements"] += info.numel
        entry["bytes"] += info.nbytes

    def ratio(bits: int, params: int) -> float | None:
        return bits / params if params else None

    return {
        "path": header.path,
        "name": meta.get("name"),
        "description": meta.get("description"),
        "architecture": meta["architecture"],
        "format_version": meta["format_version"],
        "license": meta["license"],
        "provenance": meta["provenance"],
        "config": meta["config"],
        "file_bytes": header.file_size,
        "header_bytes": header.header_size,
        "tensors": len(header.tensors),
        "parameters": total,
        "parameters_1bit": params_1bit,
        "parameters_high_precision": params_hp,
        "fraction_1bit": ratio(params_1bit, total),
        "layers_1bit": len(header.layers),
        "schemes": schemes,
        "bits_per_weight": ratio(header.file_size * 8, total),
        "bits_per_weight_1bit": ratio(packed_bytes * 8, params_1bit),
        "bits_per_weight_high_precision": ratio(bytes_hp * 8, params_hp),
        "dtypes": dtypes,
    }
