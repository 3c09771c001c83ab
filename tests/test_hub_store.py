"""The model store: the built-in model, import, verify, rm, info, resolve and the catalog file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bonsai.cli import main
from bonsai.format import LayerSpec, flatten_layer, save_checkpoint
from bonsai.hub import BUILTIN_NAME, HubError, InvalidCheckpoint, ModelNotFound, Store, resolve
from bonsai.hub import catalog, store as store_module
from bonsai.kernels import PackedWeight, pack_signs


def tiny_checkpoint(path: Path, seed: int, name: str = "tiny", **extra) -> Path:
    """A valid one-layer Bonsai checkpoint with random weights (a few hundred bytes)."""
    g = torch.Generator().manual_seed(seed)
    weight = PackedWeight(signs=pack_signs(torch.randn(6, 12, generator=g)), in_features=12, row_scale=torch.rand(6, generator=g) + 0.1)
    tensors = {**flatten_layer("proj", weight), "norm.weight": torch.randn(12, generator=g)}
    meta = {
        "architecture": "dit",
        "config": {"dim": 12},
        "quantization": {"layers": {"proj": LayerSpec.of(weight, "onebit").to_json()}},
        "provenance": {"source": "random"},
        "license": "Apache-2.0",
        "name": name,
        **extra,
    }
    save_checkpoint(path, tensors, meta)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty store in BONSAI_HOME and no built-in weights (tests that need them install them)."""
    monkeypatch.setenv("BONSAI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(store_module, "BUILTIN_PATH", tmp_path / "pkg" / "bonsai-emoji.safetensors")
    return tmp_path / "home"


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, ["models", *args], input=input)


def test_builtin_missing_is_listed_not_fatal(home):
    result = run("list")
    assert result.exit_code == 0, result.output
    assert f"{BUILTIN_NAME}@built-in" in result.output and "missing" in result.output
    with pytest.raises(ModelNotFound, match="missing; reinstall bonsai"):
        Store.default().resolve(BUILTIN_NAME)


def test_builtin_listed_from_its_header_without_copy(home, tmp_path):
    store_module.BUILTIN_PATH.parent.mkdir()
    builtin = tiny_checkpoint(store_module.BUILTIN_PATH, 1, name=BUILTIN_NAME, version="1.0", license="CC-BY-4.0")
    result = run("list", "--json")
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)
    assert entry["name"] == BUILTIN_NAME and entry["version"] == "1.0" and entry["status"] == "built-in"
    assert (entry["license"], entry["architecture"], entry["size"]) == ("CC-BY-4.0", "dit", builtin.stat().st_size)
    assert Store.default().resolve(BUILTIN_NAME) == builtin
    assert Store.default().resolve(f"{BUILTIN_NAME}@1.0") == builtin
    assert not home.exists()  # nothing copied, no store created
    assert run("rm", "--yes", BUILTIN_NAME).exit_code == 1


def test_import_copies_and_records(home, tmp_path):
    src = tiny_checkpoint(tmp_path / "a.safetensors", 2, name="tiny")
    before = src.read_bytes()
    result = run("import", str(src))
    assert result.exit_code == 0, result.output
    [entry] = Store.default().entries()
    digest = sha(src)
    assert (entry.name, entry.version, entry.sha256, entry.size) == ("tiny", digest[:12], digest, len(before))
    assert (entry.license, entry.architecture, entry.source) == ("Apache-2.0", "dit", f"import:{src.resolve()}")
    stored = home / "models" / entry.file
    assert stored.read_bytes() == before and src.read_bytes() == before
    assert stored.stat().st_ino != src.stat().st_ino
    assert sorted(os.listdir(home / "models")) == [entry.file]  # no temporary left behind
    # name, name@version and the file itself all resolve; importing the same bytes again is a no-op
    store = Store.default()
    assert store.resolve("tiny") == store.resolve(f"tiny@{digest[:12]}") == stored
    assert store.resolve(src) == src
    assert run("import", str(src)).exit_code == 0 and len(store.entries()) == 1


def test_import_link_and_names(home, tmp_path):
    src = tiny_checkpoint(tmp_path / "b.safetensors", 3, name="linked", version="2.1")
    result = run("import", "--link", "--name", "renamed", str(src))
    assert result.exit_code == 0, result.output
    entry = Store.default().get("renamed@2.1")
    assert (Store.default().models_dir / entry.file).stat().st_ino == src.stat().st_ino
    other = tiny_checkpoint(tmp_path / "c.safetensors", 4, name="linked", version="2.1")
    with pytest.raises(HubError, match="already in the store with other contents"):
        Store.default().add(other, "test", name="renamed")
    with pytest.raises(HubError, match="built-in model's name"):
        Store.default().add(other, "test", name=BUILTIN_NAME)
    with pytest.raises(HubError, match="invalid model name"):
        Store.default().add(other, "test", name="a/b")


def test_import_rejects_non_checkpoints(home, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(300))
    result = run("import", str(bad))
    assert result.exit_code == 1 and "bad.safetensors" in result.output and "\n" == result.output[-1]
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(InvalidCheckpoint):
        Store.default().add(bad, "test")
    assert Store.default().entries() == [] and not (home / "models").exists()


def test_verify_catches_a_flipped_byte(home, tmp_path):
    store = Store.default()
    good = store.add(tiny_checkpoint(tmp_path / "g.safetensors", 5, name="good"), "test")
    hurt = store.add(tiny_checkpoint(tmp_path / "h.safetensors", 6, name="hurt"), "test")
    assert run("verify", "good").exit_code == 0
    path = store.path_of(hurt)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the tensor data: the size and header still look fine
    path.write_bytes(bytes(data))
    assert store.problem(hurt) is None  # the cheap check cannot see it ...
    result = run("verify")
    assert result.exit_code == 1
    assert f"{good.ref}: ok" in result.output
    assert f"{hurt.ref}: corrupted: sha256 {hashlib.sha256(bytes(data)).hexdigest()}" in result.output
    assert "2 of 3 models failed verification" in result.output  # the hurt one and the absent built-in
    path.unlink()
    assert f"{hurt.ref}: missing" in run("verify", hurt.ref).output
    with pytest.raises(ModelNotFound, match=f"{hurt.ref}: its file .* is missing"):
        store.resolve("hurt")


def test_rm_asks_unless_yes(home, tmp_path):
    store = Store.default()
    entry = store.add(tiny_checkpoint(tmp_path / "r.safetensors", 7, name="gone"), "test")
    assert run("rm", "gone", input="n\n").exit_code == 1
    assert store.path_of(entry).exists() and store.entries() == [entry]
    result = run("rm", "gone", input="y\n")
    assert result.exit_code == 0, result.output
    assert not store.path_of(entry).exists() and store.entries() == []
    assert "no model named 'gone'" in run("rm", "--yes", "gone").output


def test_resolve_errors_name_known_models(home, tmp_path):
    store = Store.default()
    entry = store.add(tiny_checkpoint(tmp_path / "k.safetensors", 8, name="known"), "test")
    with pytest.raises(ModelNotFound) as excinfo:
        store.resolve("nope")
    message = str(excinfo.value)
    assert "\n" not in message and f"known: {BUILTIN_NAME}, {entry.ref}" in message and "bonsai models pull" in message
    with pytest.raises(ModelNotFound, match="no model named 'known@9'"):
        store.resolve("known@9")


def test_info_shows_entry_and_summary(home, tmp_path):
    entry = Store.default().add(tiny_checkpoint(tmp_path / "i.safetensors", 9, name="shown"), "test")
    result = run("info", "shown")
    assert result.exit_code == 0, result.output
    assert f"sha256          {entry.sha256}" in result.output
    assert "architecture    dit" in result.output and "bits/weight" in result.output  # entry, then summary
    doc = json.loads(run("info", "--json", entry.ref).output)
    assert doc["entry"]["sha256"] == entry.sha256 and doc["checkpoint"]["parameters_1bit"] == 72


def test_top_level_info_takes_a_model_name_or_a_path(home, tmp_path):
    store_module.BUILTIN_PATH.parent.mkdir()
    tiny_checkpoint(store_module.BUILTIN_PATH, 1, name=BUILTIN_NAME)
    loose = tiny_checkpoint(tmp_path / "loose.safetensors", 2, name="loose")
    entry = Store.default().add(tiny_checkpoint(tmp_path / "n.safetensors", 3, name="named"), "test")
    for model, name in ((BUILTIN_NAME, BUILTIN_NAME), ("named", "named"), (entry.ref, "named"), (str(loose), "loose")):
        result = CliRunner().invoke(main, ["info", model])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"name            {name}\n") and "bits/weight" in result.output
    absent = str(tmp_path / "absent.safetensors")
    for model, message in (("nope", "no model named 'nope' (known: "), (absent, f"{absent}: no such file")):
        result = CliRunner().invoke(main, ["info", model])
        assert result.exit_code == 1 and result.output.startswith(f"Error: {message}") and result.output.count("\n") == 1


def test_catalog_is_validated_and_written_atomically(home, tmp_path):
    Store.default().add(tiny_checkpoint(tmp_path / "c.safetensors", 10), "test")
    assert sorted(p.name for p in home.iterdir()) == ["catalog.json", "models"]
    doc = json.loads((home / "catalog.json").read_text())
    assert doc["format"] == "bonsai-catalog" and set(doc["models"][0]) == {
        "name", "version", "file", "size", "sha256", "license", "source", "architecture", "added"
    }
    (home / "catalog.json").write_text('{"format": "bonsai-catalog", "version": 1, "models": [{"name": "x"}]}')
    with pytest.raises(HubError, match=r"catalog.json: models\[0\] must have exactly the fields"):
        catalog.load(home / "catalog.json")
    result = run("list")
    assert result.exit_code == 1 and "catalog.json" in result.output


def test_module_resolve_uses_bonsai_home(home, tmp_path):
    entry = Store.default().add(tiny_checkpoint(tmp_path / "p.safetensors", 12, name="piped"), "test")
    assert resolve("piped") == home / "models" / entry.file
    with pytest.raises(ModelNotFound, match="no model named 'absent'"):
        resolve("absent")


def test_names_sharing_a_file_name_never_overwrite_each_other(home, tmp_path):
    store = Store.default()
    first = store.add(tiny_checkpoint(tmp_path / "a.safetensors", 13, name="model-1.0", version="2"), "test")
    second = tiny_checkpoint(tmp_path / "b.safetensors", 14, name="model", version="1.0-2")  # also model-1.0-2.safetensors
    for mode in ("copy", "link"):
        with pytest.raises(HubError, match=f"model@1.0-2 would be stored as {first.file}, the file of {first.ref}"):
            store.add(second, "test", mode=mode)
    assert store.entries() == [first] and store.problem(first, deep=True) is None
    assert sorted(os.listdir(store.models_dir)) == [first.file]


def test_names_with_a_trailing_newline_are_refused(home, tmp_path):
    with pytest.raises(HubError, match="invalid model name"):
        catalog.check_name("tiny\n")
    with pytest.raises(HubError, match="invalid model version"):
        Store.default().add(tiny_checkpoint(tmp_path / "n.safetensors", 15, version="1\n"), "test")
    assert Store.default().entries() == []


def test_link_replaces_a_leftover_file_no_entry_owns(home, tmp_path):
    store = Store.default()
    store.models_dir.mkdir(parents=True)
    (store.models_dir / "left-1.safetensors").write_bytes(b"left over by an interrupted rm")
    src = tiny_checkpoint(tmp_path / "l.safetensors", 16, name="left", version="1")
    entry = store.add(src, "test", mode="link")
    assert store.path_of(entry).stat().st_ino == src.stat().st_ino and store.problem(entry, deep=True) is None
    assert sorted(os.listdir(store.models_dir)) == [entry.file]
