"""Server settings: one frozen dataclass with defaults that work on a laptop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Size presets offered by the web UI; the model's native size is added in front of them.
SIZE_PRESETS = ((512, 512), (768, 512), (512, 768), (1024, 1024))


@dataclass(frozen=True)
class ServeConfig:
    """Where the server keeps its state and what it accepts.

    data_dir: history database (jobs.sqlite3) and images/ (default $BONSAI_HOME/serve).
    home: the model store (models, catalog.json, loras/); None = the default store.
    models: extra checkpoint files to offer besides the store's models.
    token: when set, every request must carry it (Bearer header, Basic password, cookie or ?token=).
    host: the address the server is bound to; bound to loopback, it answers only requests whose Host is an IP
        address, localhost or one of allowed_hosts (against DNS rebinding, see hosts.py).
    allowed_hosts: names (or '*.suffix') accepted in the Host header besides those; ("*",) = any. Given on a
        server bound to another address, they restrict it too.
    allowed_origins: pages of other origins (scheme://host[:port]) whose browsers may POST here, besides the
        server's own pages (e.g. a reverse proxy's public address); ("*",) = any.
    max_side: the largest width or height of any job; a model's own limit (4x its native side) may be lower.
    max_pixels: batch * width * height of one job (the memory guard behind "batch too large").
    """

    data_dir: Path
    home: Path | None = None
    models: tuple[Path, ...] = ()
    default_model: str | None = None
    device: str = "auto"
    token: str | None = None
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_queue: int = 16
    max_batch: int = 8
    max_side: int = 2048
    max_pixels: int = 4 * 1024 * 1024
    max_steps: int = 200
    max_body_bytes: int = 16 * 1024 * 1024
    max_upload_pixels: int = 4096 * 4096
    max_hires_scale: float = 4.0
    preview_side: int = 128
    sync_timeout_s: float = 3600.0  # how long a blocking A1111/OpenAI request waits for its job
