"""Helpers for the `bonsai serve` tests: a shared tiny pipeline, a step gate, and a live uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from bonsai.pipeline import Pipeline
from bonsai.serve.app import create_app
from bonsai.serve.config import ServeConfig

_PIPELINES: dict[str, Pipeline] = {}


class Gate:
    """Holds the worker inside a job's first denoising step until opened (open by default)."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.reached = threading.Event()

    def close(self) -> None:
        self.reached.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def wait(self) -> None:
        self.reached.set()
        assert self._open.wait(30), "gate left closed for 30 s"


class GatedPipeline:
    """A real pipeline whose step callback passes through `gate` after reporting each step."""

    def __init__(self, pipe: Pipeline, gate: Gate):
        self.pipe = pipe
        self.gate = gate

    def generate(self, prompt: str, callback=None, **kwargs: Any):
        def gated(step, total, x0):
            callback(step, total, x0)
            self.gate.wait()

        return self.pipe.generate(prompt, callback=gated if callback else None, **kwargs)

    # The runner points the pipeline's prompt tags at the server's LoRA folder.
    @property
    def lora_dir(self) -> str | None:
        return self.pipe.lora_dir

    @lora_dir.setter
    def lora_dir(self, value: str | None) -> None:
        self.pipe.lora_dir = value

    @property
    def size_multiple(self) -> int:
        return self.pipe.size_multiple


def loader(gate: Gate):
    """A pipeline loader that loads each checkpoint once per test session and gates its steps."""

    def load(path: Path, device: str) -> GatedPipeline:
        key = str(path)
        if key not in _PIPELINES:
            _PIPELINES[key] = Pipeline.from_pretrained(path, device="cpu")
        return GatedPipeline(_PIPELINES[key], gate)

    return load


def make_config(tmp: Path, checkpoint: Path, **overrides: Any) -> ServeConfig:
    base = dict(data_dir=tmp / "serve", home=tmp / "home", models=(checkpoint,), allowed_hosts=("testserver",))
    return ServeConfig(**{**base, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    app: Any

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(config: ServeConfig, gate: Gate) -> LiveServer:
    """uvicorn serving the app on 127.0.0.1:<free port> in a thread; returns once it accepts connections."""
    app = create_app(config, loader(gate))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", server, thread, app)
