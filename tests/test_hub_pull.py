"""`bonsai models pull` against a local HTTP server with byte ranges, dropped connections, 404s and bad bytes."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import socket
import threading
from collections import namedtuple
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from bonsai.cli import main
from bonsai.hub import ChecksumMismatch, DiskFull, DownloadError, InvalidCheckpoint, ModelNotFound, Store
from bonsai.hub import download as download_module
from bonsai.hub import store as store_module
from bonsai.hub.pull import part_path, pull
from test_hub_store import tiny_checkpoint


class Server:
    """Serves `files` (URL path -> bytes) on 127.0.0.1 and records (path, Range header) of every GET.

    drop_after: URL path -> bytes of body sent, once, before the connection is closed.
    ignore_range: answer 200 with the whole file even when a range is asked for.
    validator: None, "etag" (a strong ETag) or "last-modified" (a weak ETag and a Last-Modified date), both
    derived from the file's bytes; with one, a Range whose If-Range (recorded in if_ranges) names another
    version is ignored, as RFC 9110 asks.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.if_ranges: list[str | None] = []
        self.drop_after: dict[str, int] = {}
        self.ignore_range = False
        self.validator: str | None = None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                if_range = self.headers.get("If-Range")
                server.if_ranges.append(if_range)
                validators = server.validators(data)
                current = validators.get("Last-Modified", validators.get("ETag"))  # the strong one
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if match and not server.ignore_range and (if_range is None or if_range == current):
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                for key, value in validators.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.path in server.drop_after:
                    body = body[: server.drop_after.pop(self.path)]
                    self.close_connection = True
                self.wfile.write(body)

        return Handler

    def validators(self, data: bytes) -> dict[str, str]:
        """The validator headers of a response carrying `data`."""
        tag = hashlib.sha256(data).hexdigest()[:16]
        if self.validator == "etag":
            return {"ETag": f'"{tag}"'}
        if self.validator == "last-modified":  # one date per version: seconds derived from the bytes
            return {"ETag": f'W/"{tag}"', "Last-Modified": formatdate(int(tag[:7], 16), usegmt=True)}
        return {}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("BONSAI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(store_module, "BUILTIN_PATH", tmp_path / "absent.safetensors")
    return Store.default()


Model = namedtuple("Model", "data sha256")


@pytest.fixture
def model(tmp_path) -> Model:
    data = tiny_checkpoint(tmp_path / "served.safetensors", 11, name="served").read_bytes()
    return Model(data, hashlib.sha256(data).hexdigest())


def leftovers(store: Store) -> list[str]:
    """Every file of the store other than the catalog."""
    return sorted(str(p.relative_to(store.home)) for p in store.home.rglob("*") if p.is_file() and p.name != "catalog.json")


def test_dropped_connection_then_resume(server, store, model):
    server.files["/m.safetensors"] = model.data
    server.files["/m.safetensors.sha256"] = f"{model.sha256}  m.safetensors\n".encode()
    url = server.url("/m.safetensors")
    cut = len(model.data) // 3
    server.drop_after["/m.safetensors"] = cut
    result = CliRunner().invoke(main, ["models", "pull", "-q", url])
    assert result.exit_code == 1
    assert re.search(rf"network error after {cut} bytes .*run the same command again to resume", result.output)
    part = part_path(store, url)
    assert part.read_bytes() == model.data[:cut]
    assert store.entries() == [] and leftovers(store) == [str(part.relative_to(store.home))]

    server.requests.clear()
    outcome = pull(store, url, progress=False)
    assert server.requests == [("/m.safetensors.sha256", None), ("/m.safetensors", f"bytes={cut}-")]
    assert outcome.downloaded and outcome.verified
    entry = outcome.entry
    assert (entry.name, entry.sha256, entry.size, entry.source) == ("served", model.sha256, len(model.data), url)
    assert store.resolve("served").read_bytes() == model.data
    assert leftovers(store) == [f"models/{entry.file}"]  # the .part file became the model

    server.requests.clear()
    again = pull(store, url, progress=False)  # present: no network at all
    assert not again.downloaded and again.entry == entry and server.requests == []


def test_server_ignoring_range_restarts_cleanly(server, store, model):
    server.files["/m.safetensors"] = model.data
    server.ignore_range = True
    url = server.url("/m.safetensors")
    part = part_path(store, url)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 100)  # stale bytes that must not stay in front of the file
    entry = pull(store, url, sha256=model.sha256, progress=False).entry
    assert server.requests == [("/m.safetensors", "bytes=100-")]
    assert store.resolve(entry.ref).read_bytes() == model.data and not part.exists()


def test_complete_part_is_finished_without_a_body(server, store, model):
    server.files["/m.safetensors"] = model.data
    url = server.url("/m.safetensors")
    part = part_path(store, url)
    part.parent.mkdir(parents=True)
    part.write_bytes(model.data)  # e.g. interrupted between download and rename
    entry = pull(store, url, sha256=model.sha256, progress=False).entry
    assert server.requests == [("/m.safetensors", f"bytes={len(model.data)}-")]
    assert entry.sha256 == model.sha256


@pytest.mark.parametrize("where", ["option", "sidecar"])
def test_checksum_mismatch_rejected_and_cleaned_up(server, store, model, where):
    wrong = bytearray(model.data)
    wrong[-1] ^= 1  # the wrong content: same size, one bit off
    server.files["/m.safetensors"] = bytes(wrong)
    args = ["--sha256", model.sha256.upper()] if where == "option" else []
    if where == "sidecar":
        server.files["/m.safetensors.sha256"] = model.sha256.encode()
    result = CliRunner().invoke(main, ["models", "pull", "-q", *args, server.url("/m.safetensors")])
    assert result.exit_code == 1
    assert f"checksum mismatch (expected sha256 {model.sha256}, received {hashlib.sha256(wrong).hexdigest()})" in result.output
    assert store.entries() == [] and leftovers(store) == []
    with pytest.raises(ChecksumMismatch):
        pull(store, server.url("/m.safetensors"), sha256=model.sha256, progress=False)


def test_404_is_a_clear_error(server, store):
    result = CliRunner().invoke(main, ["models", "pull", server.url("/absent.safetensors")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {server.url('/absent.safetensors')}: not found (HTTP 404); check the name or URL"
    assert leftovers(store) == []


def test_network_failure_is_a_clear_error(store):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=rf"127.0.0.1:{port}/m.safetensors.sha256: network error"):
        pull(store, f"http://127.0.0.1:{port}/m.safetensors", progress=False)
    with pytest.raises(DownloadError, match="network error after 0 bytes"):
        pull(store, f"http://127.0.0.1:{port}/m.safetensors", sha256="0" * 64, progress=False)


def test_disk_space_checked_before_writing(server, store, model, monkeypatch):
    server.files["/m.safetensors"] = model.data
    usage = shutil.disk_usage(store.home.parent)
    monkeypatch.setattr(download_module.shutil, "disk_usage", lambda path: usage._replace(free=len(model.data) - 1))
    with pytest.raises(DiskFull, match=rf"not enough disk space \({len(model.data)} bytes needed, {len(model.data) - 1} free\)"):
        pull(store, server.url("/m.safetensors"), sha256=model.sha256, progress=False)
    assert leftovers(store) == []


def test_downloaded_non_checkpoint_is_rejected(server, store):
    junk = b"not a checkpoint at all" * 10
    server.files["/junk.safetensors"] = junk
    with pytest.raises(InvalidCheckpoint) as caught:
        pull(store, server.url("/junk.safetensors"), sha256=hashlib.sha256(junk).hexdigest(), progress=False)
    # the URL, not the .part file it was deleted from, which the message named
    assert str(caught.value).startswith(server.url("/junk.safetensors") + ": the downloaded file was deleted: header too large")
    assert ".part" not in str(caught.value)
    assert store.entries() == [] and leftovers(store) == []


def test_hf_spec_uses_hf_endpoint(server, store, model, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url("/hub/"))
    server.files["/hub/owner/repo/resolve/main/sub/m.safetensors"] = model.data
    outcome = pull(store, "hf:owner/repo/sub/m.safetensors", name="from-hf", progress=False)
    assert not outcome.verified  # no sidecar published: the received sha256 is recorded
    assert outcome.entry.sha256 == model.sha256 and outcome.entry.name == "from-hf"
    assert server.requests[-1] == ("/hub/owner/repo/resolve/main/sub/m.safetensors", None)
    with pytest.raises(DownloadError, match="expected hf:OWNER/REPO/FILE"):
        pull(store, "hf:owner/m.safetensors", progress=False)


def test_registry_names_and_offline_use(server, store, model):
    server.files["/r.safetensors"] = model.data
    store.home.mkdir(parents=True)
    (store.home / "registry.json").write_text(json.dumps({"models": {"tiny": {"url": server.url("/r.safetensors"), "sha256": model.sha256}}}))
    result = CliRunner().invoke(main, ["models", "pull", "-q", "tiny"])
    assert result.exit_code == 0, result.output
    assert server.requests == [("/r.safetensors", None)]  # the registry's sha256: no sidecar asked for
    result = CliRunner().invoke(main, ["models", "pull", "tiny"])
    assert result.exit_code == 0 and "already present" in result.output
    assert "tiny@" in CliRunner().invoke(main, ["models", "list"]).output
    assert len(server.requests) == 1  # present models need no network
    with pytest.raises(ModelNotFound, match=r"'other' is neither in the store nor in .*registry.json"):
        pull(store, "other", progress=False)


def test_disk_full_while_writing_keeps_the_part(server, store, model, monkeypatch):
    server.files["/m.safetensors"] = model.data

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(download_module.os, "fsync", no_space)
        with pytest.raises(DiskFull, match=rf"disk full after {len(model.data)} bytes; free space and run again to resume"):
            pull(store, server.url("/m.safetensors"), sha256=model.sha256, progress=False)
    assert store.entries() == [] and len(leftovers(store)) == 1  # the .part, resumed below
    assert pull(store, server.url("/m.safetensors"), sha256=model.sha256, progress=False).entry.sha256 == model.sha256


@pytest.mark.parametrize("validator", ["etag", "last-modified"])
def test_resume_after_the_file_changed_starts_over(server, store, tmp_path, validator):
    # Two versions with the same header and size: a mix of them would pass every check but the sha256, unknown here.
    old = tiny_checkpoint(tmp_path / "old.safetensors", 21, name="changing").read_bytes()
    new = tiny_checkpoint(tmp_path / "new.safetensors", 22, name="changing").read_bytes()
    assert len(old) == len(new) and old != new
    server.validator = validator
    server.files["/m.safetensors"] = old
    url = server.url("/m.safetensors")
    cut = len(old) - 16  # the whole header and part of the tensors
    server.drop_after["/m.safetensors"] = cut
    with pytest.raises(DownloadError, match=f"network error after {cut} bytes"):
        pull(store, url, progress=False)
    part = part_path(store, url)
    assert leftovers(store) == [f"downloads/{part.name}", f"downloads/{part.name}.validator"]
    old_validator = server.validators(old)["ETag" if validator == "etag" else "Last-Modified"]

    server.files["/m.safetensors"] = new
    server.requests.clear()
    server.if_ranges.clear()
    outcome = pull(store, url, progress=False)
    assert server.requests[-1] == ("/m.safetensors", f"bytes={cut}-") and server.if_ranges[-1] == old_validator
    assert outcome.entry.sha256 == hashlib.sha256(new).hexdigest()
    assert store.resolve(outcome.entry.ref).read_bytes() == new
    assert leftovers(store) == [f"models/{outcome.entry.file}"]


def test_resume_of_an_unchanged_file_sends_its_validator(server, store, model):
    server.validator = "etag"
    server.files["/m.safetensors"] = model.data
    url = server.url("/m.safetensors")
    cut = len(model.data) // 2
    server.drop_after["/m.safetensors"] = cut
    with pytest.raises(DownloadError):
        pull(store, url, sha256=model.sha256, progress=False)
    server.if_ranges.clear()
    outcome = pull(store, url, sha256=model.sha256, progress=False)
    assert server.requests[-1] == ("/m.safetensors", f"bytes={cut}-")
    assert server.if_ranges == [server.validators(model.data)["ETag"]]  # answered 206: only the rest was sent
    assert outcome.entry.sha256 == model.sha256 and leftovers(store) == [f"models/{outcome.entry.file}"]
