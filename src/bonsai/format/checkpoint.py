"""Save and load Bonsai checkpoints: atomic writes, memory-mapped reads, full validation."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bonsai.kernels.packed import PackedWeight

from .errors import CheckpointError
from .header import DTYPE_CODES, Header, read_header
from .schema import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, FINITE_SUFFIXES, LayerSpec, TensorSpec, validate_metadata

_MAX_LISTED = 8  # problems named in one error message; the rest are counted
_MISMATCH_FIX = "the file does not match what was expected: re-export or re-convert the model"


def _describe(spec: TensorSpec) -> str:
    dtype, shape = spec
    return f"{'a float dtype' if dtype is None else dtype} {shape}"


def validate_tensors(
    found: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    expected: Mapping[str, TensorSpec],
    path: str | os.PathLike[str],
    fix: str = _MISMATCH_FIX,
) -> None:
    """Compare name -> (dtype, shape) maps; raise CheckpointError naming every missing, extra or mismatched tensor.

    An expected dtype of None accepts any floating-point dtype.
    """
    problems = [f"missing tensor '{name}' ({_describe(spec)})" for name, spec in expected.items() if name not in found]
    problems += [f"unexpected tensor '{name}'" for name in found if name not in expected]
    for name, (want_dtype, want_shape) in expected.items():
        if name not in found:
            continue
        dtype, shape = found[name]
        if tuple(shape) != tuple(want_shape):
            problems.append(f"tensor '{name}' has shape {tuple(shape)}, expected {tuple(want_shape)}")
        if dtype != want_dtype and not (want_dtype is None and dtype.is_floating_point):
            problems.append(f"tensor '{name}' has dtype {dtype}, expected {want_dtype or 'a float dtype'}")
    if problems:
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError("; ".join(problems[:_MAX_LISTED]) + more, path, fix)


def check_packed_layers(
    layers: Mapping[str, LayerSpec],
    found: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    path: str | os.PathLike[str],
) -> None:
    """Every packed layer has exactly the tensors its spec implies, and no sign tensor lacks a spec."""
    for name in found:
        if name.endswith(".signs") and name.rsplit(".", 1)[0] not in layers:
            raise CheckpointError(
                f"tensor '{name}' looks packed but quantization.layers has no entry '{name.rsplit('.', 1)[0]}'",
                path,
                "add the layer spec to the metadata",
            )
    expected: dict[str, TensorSpec] = {}
    for module, spec in layers.items():
        expected.update(spec.expected_tensors(module))
    owned = {name: found[name] for name in found if name.rsplit(".", 1)[0] in layers}
    validate_tensors(owned, expected, path, "the tensors do not match the file's quantization metadata")


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Raise if any scale, offset or low-rank tensor (name ending in a FINITE_SUFFIXES entry) holds NaN or inf."""
    for name, t in tensors.items():
        if name.rsplit(".", 1)[-1] in FINITE_SUFFIXES and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"non-finite values in tensor '{name}'", path, "the model is broken: re-export it")


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def save_checkpoint(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Validate and write a checkpoint atomically: a crash leaves the old file (or none), never half a file.

    `metadata` is the Bonsai document; "format" and "format_version" are filled in when absent.
    Tensors may live on any device; they are written from contiguous CPU copies in their own dtype.
    """
    path = os.fspath(path)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata}
    layers = validate_metadata(meta, path)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"'{name}' is a {type(t).__name__}, not a tensor", path)
        if t.dtype not in DTYPE_CODES:
            raise CheckpointError(f"tensor '{name}' has dtype {t.dtype}, which safetensors cannot store", path)
    check_packed_layers(layers, _shapes(tensors), path)
    check_finite(tensors, path)
    try:
        document = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"metadata is not plain JSON ({e})", path, "use str/int/float/bool/list/dict values"
        ) from None
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}

    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask decides the final mode
    except OSError as e:
        raise CheckpointError(f"cannot create a file in {directory} ({e.strerror})", path) from None
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        try:
            save_file(cpu, tmp, metadata={METADATA_KEY: document})
        except (SafetensorError, RuntimeError, ValueError) as e:
            # e.g. tensors sharing storage (tied weights): the caller must store them once
            raise CheckpointError(
                f"safetensors could not write the tensors ({' '.join(str(e).split())})", path
            ) from None
        os.chmod(tmp, mode)  # safetensors may replace the file with a private (0600) one
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        read_header(tmp)  # what we wrote must pass our own strict reader
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not every filesystem allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(eq=False)
class Checkpoint:
    """A loaded checkpoint: its checked header and its tensors (memory-mapped on CPU)."""

    header: Header
    tensors: dict[str, torch.Tensor]

    @property
    def path(self) -> str:
        return self.header.path

    @property
    def metadata(self) -> dict[str, Any]:
        return self.header.metadata

    @property
    def layers(self) -> dict[str, LayerSpec]:
        return self.header.layers

    def packed(self, module: str) -> PackedWeight:
        """The PackedWeight of packed layer `module` (its bias, if any, is tensors[module + '.bias'])."""
        spec = self.layers.get(module)
        if spec is None:
            raise KeyError(f"{self.path}: '{module}' is not a packed layer of this checkpoint")
        names = [n.rsplit(".", 1)[1] for n in spec.expected_tensors(module) if not n.endswith(".bias")]
        return PackedWeight(
            in_features=spec.in_features,
            group_size=spec.group_size,
            **{name: self.tensors[f"{module}.{name}"] for name in names},
        )


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    expected: Mapping[str, TensorSpec] | None = None,
) -> Checkpoint:
    """Check and load a checkpoint. Tensors keep their stored dtypes; on CPU they are memory-mapped.

    `expected` (name -> (dtype, shape), e.g. from the model's state_dict) is compared in full when given.
    """
    header = read_header(path)
    found = {name: (info.dtype, info.shape) for name, info in header.tensors.items()}
    check_packed_layers(header.layers, found, header.path)
    if expected is not None:
        validate_tensors(found, expected, header.path)
    try:
        with safe_open(header.path, framework="pt", device=str(device)) as f:
            if set(f.keys()) != set(header.tensors):
                raise CheckpointError("the file changed while it was being loaded", header.path, "load it again")
            tensors = {name: f.get_tensor(name) for name in header.tensors}
    except SafetensorError as e:
        raise CheckpointError(f"safetensors could not read the file ({e})", header.path) from None
    check_finite(tensors, header.path)
    return Checkpoint(header, tensors)
