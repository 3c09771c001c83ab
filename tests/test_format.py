"""The checkpoint format: exact round trips, and every malformed file rejected with a message naming the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from bonsai.format import (
    MAX_HEADER_BYTES,
    CheckpointError,
    LayerSpec,
    flatten_layer,
    load_checkpoint,
    read_header,
    save_checkpoint,
    summarize,
    validate_tensors,
)
from bonsai.format import checkpoint as checkpoint_module
from bonsai.format.header import read_layout
from bonsai.kernels import PackedWeight, pack_signs

QKV, FC1 = "blocks.0.attn.qkv", "blocks.0.mlp.fc1"


def _packed(
    n: int, k: int, g: torch.Generator, group_size: int = 0, col: bool = False, offset: bool = False, rank: int = 0
) -> PackedWeight:
    return PackedWeight(
        signs=pack_signs(torch.randn(n, k, generator=g)),
        in_features=k,
        row_scale=torch.rand(n, generator=g) + 0.1,
        group_size=group_size,
        group_scale=(torch.rand(n, -(-k // group_size), generator=g) + 0.5).half() if group_size else None,
        col_scale=torch.rand(k, generator=g) + 0.5 if col else None,
        row_offset=torch.randn(n, generator=g) if offset else None,
        lowrank_u=torch.randn(n, rank, generator=g).bfloat16() if rank else None,
        lowrank_v=torch.randn(rank, k, generator=g).bfloat16() if rank else None,
    )


def _model() -> tuple[dict[str, torch.Tensor], dict]:
    """A tiny model: two packed layers (K=20 is not a multiple of 8) and high-precision tensors of every dtype."""
    g = torch.Generator().manual_seed(0)
    qkv = _packed(12, 20, g, group_size=8, col=True, offset=True, rank=2)
    fc1 = _packed(16, 16, g)
    tensors = {
        **flatten_layer(QKV, qkv, bias=torch.randn(12, generator=g).bfloat16()),
        **flatten_layer(FC1, fc1),
        "embed.weight": torch.randn(10, 4, generator=g).bfloat16(),
        "norm.weight": torch.randn(4, generator=g),
        "final.weight": torch.randn(3, 4, generator=g).half(),
        "palette": torch.randint(0, 256, (5,), generator=g, dtype=torch.uint8),
    }
    layers = {QKV: LayerSpec.of(qkv, "onebit", bias=True).to_json(), FC1: LayerSpec.of(fc1, "rowscale").to_json()}
    meta = {
        "architecture": "dit",
        "config": {"dim": 4, "depth": 1},
        "quantization": {"layers": layers},
        "provenance": {"source": "random", "recipe": "none", "date": "2025-01-01"},
        "license": "Apache-2.0",
        "name": "tiny-test",
    }
    return tensors, meta


@pytest.fixture
def good(tmp_path):
    tensors, meta = _model()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, tensors, meta)
    return path, tensors, meta


def _raw(path, tensors: dict, meta: dict | None, **doc_changes) -> None:
    """Write a safetensors file directly, bypassing save_checkpoint's checks."""
    doc = None if meta is None else {"format": "bonsai", "format_version": 1, **meta, **doc_changes}
    save_file(tensors, path, metadata=None if doc is None else {"bonsai": json.dumps(doc)})


def _header_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def test_round_trip_is_exact(good):
    path, tensors, meta = good
    ckpt = load_checkpoint(path)
    assert set(ckpt.tensors) == set(tensors)
    for name, t in tensors.items():
        assert ckpt.tensors[name].dtype == t.dtype, name
        assert torch.equal(ckpt.tensors[name], t), name
    assert {str(t.dtype) for t in ckpt.tensors.values()} >= {
        "torch.uint8",
        "torch.float32",
        "torch.float16",
        "torch.bfloat16",
    }
    assert ckpt.metadata == {"format": "bonsai", "format_version": 1, **meta}
    assert ckpt.layers[QKV] == LayerSpec("onebit", 20, 12, 8, 2, True, True, True)
    g = torch.Generator().manual_seed(0)
    original = _packed(12, 20, g, group_size=8, col=True, offset=True, rank=2)
    assert torch.equal(ckpt.packed(QKV).dequantize(torch.float64), original.dequantize(torch.float64))


def test_expected_tensors_are_compared(good):
    path, tensors, _ = good
    expected = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    load_checkpoint(path, expected=expected)
    expected["norm.weight"] = (torch.float32, (5,))
    with pytest.raises(CheckpointError, match=r"tensor 'norm.weight' has shape \(4,\), expected \(5,\)"):
        load_checkpoint(path, expected=expected)


def test_validate_tensors_names_every_problem():
    found = {"a": (torch.float32, (2,)), "b": (torch.float16, (3,)), "extra": (torch.uint8, (1,))}
    expected = {"a": (torch.float32, (4,)), "b": (torch.float32, (3,)), "gone": (torch.uint8, (1,))}
    with pytest.raises(CheckpointError) as e:
        validate_tensors(found, expected, "m.safetensors")
    msg = str(e.value)
    assert msg.startswith("m.safetensors: ")
    assert "missing tensor 'gone'" in msg and "unexpected tensor 'extra'" in msg
    assert "tensor 'a' has shape (2,), expected (4,)" in msg
    assert "tensor 'b' has dtype torch.float16, expected torch.float32" in msg


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop(f"{FC1}.row_scale"), rf"missing tensor '{FC1}.row_scale'"),
        (lambda t: t.update({f"{FC1}.weight": torch.zeros(16, 16)}), rf"unexpected tensor '{FC1}.weight'"),
        (
            lambda t: t.update({f"{QKV}.signs": torch.zeros(12, 2, dtype=torch.uint8)}),
            rf"'{QKV}.signs' has shape \(12, 2\), expected \(12, 3\)",
        ),
        (
            lambda t: t.update({f"{QKV}.row_scale": t[f"{QKV}.row_scale"].half()}),
            rf"'{QKV}.row_scale' has dtype torch.float16, expected torch.float32",
        ),
        (
            lambda t: t.update({f"{QKV}.bias": torch.zeros(12, dtype=torch.int32)}),
            rf"'{QKV}.bias' has dtype torch.int32, expected a float dtype",
        ),
        (
            lambda t: t.update({f"{QKV}.col_scale": torch.full((20,), float("nan"))}),
            rf"non-finite values in tensor '{QKV}.col_scale'",
        ),
        (
            lambda t: t[f"{QKV}.lowrank_v"].view(-1)[3].fill_(float("nan")),
            rf"non-finite values in tensor '{QKV}.lowrank_v'",
        ),
        (
            lambda t: t.update({f"{FC1}.row_scale": torch.full((16,), float("inf"))}),
            rf"non-finite values in tensor '{FC1}.row_scale'",
        ),
        (
            lambda t: t.update({"stray.signs": torch.zeros(2, 1, dtype=torch.uint8)}),
            r"'stray.signs' looks packed but quantization.layers has no entry 'stray'",
        ),
    ],
)
def test_bad_tensors_rejected_on_load_and_save(tmp_path, change, message):
    tensors, meta = _model()
    change(tensors)
    path = tmp_path / "bad.safetensors"
    _raw(path, tensors, meta)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint(tmp_path / "never.safetensors", tensors, meta)
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"format_version": 2},
            r"format version 2 is not supported \(this Bonsai reads format version 1\); upgrade Bonsai",
        ),
        ({"format": "other"}, r"metadata format is 'other', expected 'bonsai'"),
        ({"license": None}, r"metadata field 'license' must be str, got NoneType"),
        (
            {"quantization": {"layers": {FC1: {"scheme": "rowscale", "in_features": 16}}}},
            rf"quantization.layers\['{FC1}'\].out_features must be an integer",
        ),
    ],
)
def test_bad_metadata_rejected(tmp_path, changes, message):
    tensors, meta = _model()
    _raw(tmp_path / "m.safetensors", tensors, meta, **changes)
    with pytest.raises(CheckpointError, match=message):
        read_header(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint(tmp_path / "never.safetensors", tensors, {**meta, **changes})


def test_missing_required_field(tmp_path):
    tensors, meta = _model()
    del meta["provenance"]
    with pytest.raises(CheckpointError, match="lacks the required field 'provenance'"):
        save_checkpoint(tmp_path / "m.safetensors", tensors, meta)
    meta["provenance"] = {"date": object()}
    with pytest.raises(CheckpointError, match="metadata is not plain JSON"):
        save_checkpoint(tmp_path / "m.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match="cannot create a file in .*absent"):
        save_checkpoint(tmp_path / "absent" / "m.safetensors", *_model())
    assert os.listdir(tmp_path) == []


def test_truncated_files(good):
    path, _, _ = good
    data = path.read_bytes()
    for cut, message in (
        (4, "4 bytes, too short for a safetensors header"),
        (20, "header claims"),
        (len(data) - 3, "tensor '.*' ends at data byte"),
    ):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"file is truncated: {message}"):
            read_header(path)


@pytest.mark.parametrize("zipped", [True, False])
def test_a_pickle_file_is_named_as_such(tmp_path, zipped):
    # A .ckpt given as a checkpoint was reported as a safetensors header "too large": corrupt, it said.
    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.randn(4, 4)}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError, match=r"a PyTorch pickle file \(.ckpt/.pt/.bin\), not safetensors.*never loads pickle"):
        read_header(path)
    # a real header whose length starts with the byte 0x80, as a pickle does, is still read
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={"pad": "x" * (0x180 - 87)})
    assert path.read_bytes()[:2] == b"\x80\x01"
    assert read_layout(path).tensors["w"].shape == (1,)


def test_structural_header_errors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=f"header too large: {MAX_HEADER_BYTES + 1} bytes claimed"):
        read_header(path)
    path.write_bytes((5).to_bytes(8, "little") + b"{abc}")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        read_header(path)
    raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {}}'
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"x")
    with pytest.raises(CheckpointError, match=r"header is not valid JSON \(duplicate keys \['a'\]\)"):
        read_header(path)
    path.write_bytes((30_000).to_bytes(8, "little") + b"[" * 30_000)
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        read_header(path)
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    path.write_bytes(_header_bytes({"a": entry, "b": {**entry, "data_offsets": [4, 12]}}, bytes(12)))
    with pytest.raises(CheckpointError, match="tensors 'a' and 'b' overlap"):
        read_header(path)
    path.write_bytes(_header_bytes({"a": entry}, bytes(10)))
    with pytest.raises(CheckpointError, match="2 bytes after the last tensor"):
        read_header(path)
    for metadata in ([], 0, ""):
        path.write_bytes(_header_bytes({"__metadata__": metadata, "a": entry}, bytes(8)))
        with pytest.raises(CheckpointError, match="header __metadata__ must map strings to strings"):
            read_layout(path)
    path.write_bytes(_header_bytes({"a": {**entry, "data_offsets": [0, 4]}}, bytes(4)))
    with pytest.raises(CheckpointError, match=r"tensor 'a' spans 4 bytes, but F32 \[2\] needs 8"):
        read_header(path)


def test_plain_safetensors_is_not_bonsai(tmp_path):
    path = tmp_path / "plain.safetensors"
    _raw(path, {"w": torch.randn(3, 3)}, None)
    with pytest.raises(CheckpointError, match=r"not a Bonsai checkpoint .*; convert the model"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="file not found"):
        read_header(tmp_path / "absent.safetensors")


def test_failed_write_keeps_the_old_file(good, monkeypatch):
    path, tensors, meta = good
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, tensors, {**meta, "name": "replacement"})
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]
    monkeypatch.undo()
    bad = {**tensors, f"{FC1}.row_scale": torch.full((16,), float("nan"))}
    with pytest.raises(CheckpointError):
        save_checkpoint(path, bad, meta)
    assert path.read_bytes() == before and os.listdir(path.parent) == [path.name]


def test_written_file_mode_follows_umask(good):
    path, _, _ = good
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_summary_counts(good):
    path, tensors, _ = good
    s = summarize(path)
    packed_bytes = sum(
        t.numel() * t.element_size()
        for n, t in tensors.items()
        if n.startswith(("blocks.",)) and not n.endswith(".bias")
    )
    hp = {n: t for n, t in tensors.items() if not n.startswith("blocks.") or n.endswith(".bias")}
    params_1bit = 12 * 20 + 16 * 16
    params_hp = 12 + 10 * 4 + 4 + 3 * 4 + 5
    assert (s["parameters_1bit"], s["parameters_high_precision"]) == (params_1bit, params_hp)
    assert s["parameters"] == params_1bit + params_hp and s["tensors"] == len(tensors) and s["layers_1bit"] == 2
    assert s["file_bytes"] == path.stat().st_size
    assert s["bits_per_weight"] == s["file_bytes"] * 8 / (params_1bit + params_hp)
    assert s["bits_per_weight_1bit"] == packed_bytes * 8 / params_1bit
    assert s["bits_per_weight_high_precision"] == sum(t.numel() * t.element_size() for t in hp.values()) * 8 / params_hp
    assert s["dtypes"]["bfloat16"] == {"tensors": 4, "elements": 24 + 40 + 12 + 40, "bytes": 2 * 116}
    assert s["schemes"] == {"onebit": {"layers": 1, "parameters": 240}, "rowscale": {"layers": 1, "parameters": 256}}


def _bonsai(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonsai.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_command(good):
    path, _, _ = good
    text = _bonsai("info", str(path))
    assert text.returncode == 0, text.stderr
    for expected in (
        "tiny-test",
        "dit",
        "Apache-2.0",
        "bits/weight",
        "2025-01-01",
        "1 layer, 256 params",
        "2 1-bit layers",
    ):
        assert expected in text.stdout
    machine = _bonsai("info", "--json", str(path))
    assert machine.returncode == 0, machine.stderr
    assert json.loads(machine.stdout) == json.loads(json.dumps(summarize(path)))
    path.write_bytes(path.read_bytes()[:-1])
    bad = _bonsai("info", str(path))
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith(f"Error: {path}: file is truncated")


def test_info_keeps_long_keys_apart_from_their_values(good):
    """Config keys longer than the column (common in diffusers configs) are still followed by a space."""
    from bonsai.format.cli import render

    path, _, _ = good
    s = {**summarize(path), "config": {"projection_class_embeddings_input_dim": 64, "sample_size": 8}}
    lines = render(s).splitlines()
    assert "  projection_class_embeddings_input_dim 64" in lines
    assert "  sample_size           8" in lines  # short keys keep the column
