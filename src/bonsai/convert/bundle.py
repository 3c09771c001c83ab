"""The parts of a diffusers pipeline other than its denoiser (text encoders, tokenizers, VAE,
scheduler, ...), as a converted checkpoint carries them.

`bonsai quantize --bundle` picks one of:
- "reference" (default): the checkpoint records the source pipeline folder's absolute path;
- "copy": the parts are copied unchanged (same files, same dtypes) beside the checkpoint, with the
  source's model_index.json, so the checkpoint's folder is a diffusers pipeline folder whose
  denoiser is the Bonsai file; the source can then be deleted;
- "none": nothing is recorded (the user passes a pipeline at load time).

Either way the checkpoint's "pipeline" metadata lists the parts' files ("parts": part -> file ->
{"bytes"} and, for .safetensors weights, "tensors": name -> [dtype, shape]); `check_parts`
compares a folder against it before diffusers loads from it, so a missing or different part fails
with a message naming the file instead of deep inside diffusers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..format import CheckpointError
from .adapters import Adapter
from .source import SourceError

BUNDLE_MODES = ("reference", "copy", "none")
MODEL_INDEX = "model_index.json"
MARKER = "_bonsai_checkpoint"  # key added to a bundle's model_index.json: the checkpoint's file name
# Weight formats that need pickle (or another framework) to load: never copied, never loaded.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx")
_MAX_HEADER = 64 * 1024 * 1024

Manifest = dict[str, dict[str, dict[str, Any]]]  # part -> relative file -> {"bytes", "tensors"?}


def _model_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / MODEL_INDEX).read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{folder / MODEL_INDEX} is not readable JSON ({e})") from None
    if not isinstance(index, dict):
        raise SourceError(f"{folder / MODEL_INDEX} must be a JSON object")
    return index


def pipeline_parts(pipeline_dir: Path, denoiser: str) -> list[str]:
    """Component folders of a pipeline folder other than `denoiser` (entries [library, class] of model_index.json)."""
    index = _model_index(pipeline_dir)
    return [
        name for name, entry in index.items()
        if not name.startswith("_") and name != denoiser and isinstance(entry, list) and len(entry) == 2 and entry[1]
    ]  # fmt: skip


def pipeline_metadata(adapter: Adapter, pipeline_dir: Path | None, bundle: str) -> dict[str, Any]:
    """The "pipeline" metadata of a checkpoint whose denoiser came from `pipeline_dir` (None: a bare
    component folder or file) with the other parts kept as `bundle` says; "none" when there are none."""
    parts = [] if pipeline_dir is None or bundle == "none" else pipeline_parts(pipeline_dir, adapter.subfolder)
    return {
        "text_encoder": "diffusers",
        "diffusers_class": adapter.class_name,
        "diffusers_subfolder": adapter.subfolder,
        "diffusers_pipelines": list(adapter.pipelines),
        "bundle": bundle if parts else "none",
        "diffusers_source": str(pipeline_dir) if parts and bundle == "reference" else None,
        "parts": manifest(pipeline_dir, parts) if parts else {},
    }


def safetensors_tensors(file: Path) -> dict[str, list]:
    """name -> [dtype, shape] from a .safetensors header (no tensor data is read)."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(_MAX_HEADER, file.stat().st_size - 8):
                raise ValueError(f"header length {n} is impossible")
            header = json.loads(f.read(n))
        return {k: [v["dtype"], list(v["shape"])] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"not a readable safetensors file ({e})", file, "copy the part again") from None


def _files(folder: Path) -> list[Path]:
    """Files of a part folder that a copy carries: all but pickle / other-framework weights."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix not in _OTHER_WEIGHTS)


def manifest(pipeline_dir: Path, parts: list[str]) -> Manifest:
    """What each part consists of, for `check_parts`. Raises SourceError for a part that is missing
    or whose weights exist only in pickle formats."""
    out: Manifest = {}
    for part in parts:
        folder = pipeline_dir / part
        if not folder.is_dir():
            raise SourceError(f"{folder} is missing (listed in {pipeline_dir / MODEL_INDEX})")
        files = _files(folder)
        has_other = any(p.suffix in _OTHER_WEIGHTS for p in folder.rglob("*"))
        if has_other and not any(p.suffix == ".safetensors" for p in files):
            raise SourceError(f"{folder}: only pickle/other-format weights found; Bonsai reads .safetensors only — convert them first")
        entry: dict[str, dict[str, Any]] = {}
        for p in files:
            rel = p.relative_to(folder).as_posix()
            entry[rel] = {"bytes": p.stat().st_size}
            if p.suffix == ".safetensors":
                entry[rel]["tensors"] = safetensors_tensors(p)
        out[part] = entry
    return out


def check_parts(folder: str | os.PathLike[str], parts: Manifest, checkpoint: str | os.PathLike[str]) -> None:
    """Raise CheckpointError, naming the file, if `folder` lacks a part or file of `parts` or a
    weight file's tensors (names, dtypes, shapes) differ from those recorded at conversion."""
    folder = Path(folder)
    where = f"the pipeline parts of {os.fspath(checkpoint)}"
    if not (folder / MODEL_INDEX).is_file():
        raise CheckpointError(f"{MODEL_INDEX} is missing ({where})", folder, "copy the whole output folder of bonsai quantize")
    for part, files in parts.items():
        if not (folder / part).is_dir():
            raise CheckpointError(f"part '{part}' is missing ({where})", folder / part, "copy the whole output folder of bonsai quantize")
        for rel, info in files.items():
            file = folder / part / rel
            if not file.is_file():
                raise CheckpointError(f"file is missing ({where})", file, "copy the whole output folder of bonsai quantize")
            if "tensors" not in info:
                continue
            found, want = safetensors_tensors(file), info["tensors"]
            missing = sorted(set(want) - set(found))
            changed = sorted(k for k in set(want) & set(found) if found[k] != want[k])
            if missing or changed or set(found) != set(want):
                what = (f"tensor '{missing[0]}' is missing" if missing else
                        f"tensor '{changed[0]}' is {found[changed[0]]}, expected {want[changed[0]]}" if changed else
                        f"unexpected tensor '{min(set(found) - set(want))}'")  # fmt: skip
                raise CheckpointError(f"{what} ({where})", file, "this is not the part the model was converted with")


def _conflicts(out_dir: Path, parts: list[str]) -> list[str]:
    """Names the copy would overwrite that are not from an earlier bundle."""
    index = out_dir / MODEL_INDEX
    if index.exists():
        try:
            ours = MARKER in json.loads(index.read_text())
        except (OSError, ValueError):
            ours = False
        if not ours:
            return [MODEL_INDEX]
        return []
    return [p for p in parts if (out_dir / p).exists()]


def prepare_copy(pipeline_dir: Path, parts: list[str], out: Path) -> Path:
    """Copy the parts into a hidden staging folder beside `out` (checked for conflicts first); returns it."""
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    conflicts = _conflicts(out_dir, parts)
    if conflicts:
        raise SourceError(
            f"{out_dir / conflicts[0]} already exists and is not from bonsai quantize; "
            "with --bundle copy write the checkpoint into a folder of its own, e.g. -o sd15-1bit/sd15-1bit.safetensors"
        )
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".bonsai-bundle-"))
    try:
        for part in parts:
            src = pipeline_dir / part
            for p in _files(src):
                dst = staging / part / p.relative_to(src)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dst)  # follows links (e.g. a hub cache's blobs); streams in chunks
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def finish_copy(staging: Path, pipeline_dir: Path, parts: list[str], out: Path) -> None:
    """Move the staged parts into place beside `out` (replacing an earlier bundle's) and write the
    model_index.json that names `out` as the checkpoint."""
    out_dir = out.parent
    index = out_dir / MODEL_INDEX
    old = _model_index(out_dir) if index.exists() else {}
    for name, entry in old.items():  # an earlier bundle's parts, including any the new one lacks
        if isinstance(entry, list) and (out_dir / name).is_dir() and not name.startswith("."):
            shutil.rmtree(out_dir / name)
    for part in parts:
        os.replace(staging / part, out_dir / part)
    shutil.rmtree(staging, ignore_errors=True)
    new = {**_model_index(pipeline_dir), MARKER: out.name}
    atomic_write(index, lambda tmp: Path(tmp).write_text(json.dumps(new, indent=2) + "\n"))


def bundled_checkpoint(folder: str | os.PathLike[str]) -> Path:
    """The checkpoint file of a bundle folder (written by `bonsai quantize --bundle copy`)."""
    folder = Path(folder)
    try:
        name = _model_index(folder).get(MARKER)
    except SourceError as e:
        raise CheckpointError(str(e).removeprefix(f"{folder / MODEL_INDEX} "), folder / MODEL_INDEX) from None
    if not isinstance(name, str) or Path(name).name != name:
        raise CheckpointError(
            f"names no Bonsai checkpoint ('{MARKER}')", folder / MODEL_INDEX, "pass the .safetensors checkpoint itself"
        )
    return folder / name
