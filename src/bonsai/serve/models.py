"""What the server can run: the store's models plus extra checkpoint files, and LoRA files.

Clients name models and LoRAs; they never send paths, so no request can make the server open a
file it does not list."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonsai.format import CheckpointError, read_header, summarize
from bonsai.hub import Store
from bonsai.pipeline import image_geometry

from .errors import FieldError

# A model draws at most this many times its native side. Far beyond it a model repeats itself, and
# the work grows with the pixel count squared: 1024x1024 on a 64x64 model takes minutes a step on CPU,
# holding the queue with no way to stop it mid-step.
MAX_SCALE_OVER_NATIVE = 4


@dataclass(frozen=True)
class ModelInfo:
    """One runnable (or broken) model as the APIs show it."""

    name: str
    path: Path
    source: str
    status: str  # "ok", "missing" or the reason it cannot be loaded
    summary: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def config(self) -> dict[str, Any]:
        return self.summary.get("config", {})

    @property
    def size_step(self) -> int:
        """Image sides are multiples of this (patch size, times the VAE's downsampling for a latent model)."""
        return image_geometry({"config": self.config})[0]

    @property
    def defaults(self) -> dict[str, Any]:
        """The generation defaults the checkpoint recommends, with its native size filled in."""
        size = image_geometry({"config": self.config})[1]
        found = dict(self.summary.get("pipeline_defaults") or {})
        found.setdefault("width", size)
        found.setdefault("height", size)
        return found

    @property
    def native_side(self) -> int:
        d = self.defaults
        return max(int(d["width"]), int(d["height"]))

    @property
    def max_side(self) -> int:
        """The largest width or height this model is asked to draw (a server may allow less)."""
        return MAX_SCALE_OVER_NATIVE * self.native_side

    @property
    def size_limit_reason(self) -> str:
        return f"{self.name} draws up to {self.max_side} px per side ({MAX_SCALE_OVER_NATIVE}x its native {self.native_side})"

    def to_json(self) -> dict[str, Any]:
        s = self.summary
        return {
            "name": self.name,
            "source": self.source,
            "status": self.status,
            "file_bytes": s.get("file_bytes"),
            "parameters": s.get("parameters"),
            "fraction_1bit": s.get("fraction_1bit"),
            "bits_per_weight": s.get("bits_per_weight"),
            "bits_per_weight_1bit": s.get("bits_per_weight_1bit"),
            "architecture": s.get("architecture"),
            "license": s.get("license"),
            "description": s.get("description"),
            "defaults": self.defaults if self.status == "ok" else {},
            "size_step": self.size_step if self.status == "ok" else None,
            "max_side": self.max_side if self.status == "ok" else None,
        }


def _summary(path: Path) -> tuple[str, dict[str, Any]]:
    if not path.is_file():
        return "missing", {}
    try:
        s = summarize(path)
    except (CheckpointError, OSError, ValueError, KeyError) as exc:
        return f"invalid checkpoint: {exc}", {}
    s["pipeline_defaults"] = read_header(path).metadata.get("pipeline", {}).get("defaults", {})
    return "ok", s


class ModelCatalog:
    """Lists models and LoRAs; header summaries are cached per (path, size, mtime)."""

    def __init__(self, home: Path | None, extra: tuple[Path, ...] = (), default: str | None = None):
        self.store = Store(home) if home is not None else Store.default()
        self.extra = tuple(Path(p) for p in extra)
        self.default_name = default
        self._cache: dict[tuple[str, int, int], tuple[str, dict[str, Any]]] = {}

    def _describe(self, name: str, path: Path, source: str) -> ModelInfo:
        try:
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
        except OSError:
            return ModelInfo(name, path, source, "missing")
        if key not in self._cache:
            self._cache[key] = _summary(path)
        status, summary = self._cache[key]
        return ModelInfo(name, path, source, status, summary)

    def list(self) -> list[ModelInfo]:
        """Extra files first (the ones the server was started with), then the store's models."""
        found = [self._describe(p.name.removesuffix(".safetensors"), p, "file") for p in self.extra]
        for entry in self.store.all():
            name = entry.name if entry.source == "built-in" else entry.ref
            found.append(self._describe(name, self.store.path_of(entry), entry.source))
        return found

    def default(self) -> ModelInfo | None:
        """The configured default model, else the first usable one."""
        models = self.list()
        if self.default_name:
            return next((m for m in models if m.name == self.default_name), None)
        return next((m for m in models if m.status == "ok"), None)

    def get(self, name: str | None) -> ModelInfo:
        """The usable model called `name` (None: the default); FieldError('model') otherwise."""
        models = self.list()
        model = self.default() if name is None else next((m for m in models if m.name == name), None)
        if model is None:
            known = ", ".join(m.name for m in models) or "none"
            raise FieldError("model", f"unknown model {name!r}; known: {known} (see GET /api/models)")
        if model.status != "ok":
            raise FieldError("model", f"model {model.name!r} cannot be used: {model.status}")
        return model

    @property
    def loras_dir(self) -> Path:
        return self.store.home / "loras"

    def loras(self) -> dict[str, Path]:
        """LoRA name -> file, from $BONSAI_HOME/loras/*.safetensors."""
        if not self.loras_dir.is_dir():
            return {}
        return {p.name.removesuffix(".safetensors"): p for p in sorted(self.loras_dir.glob("*.safetensors")) if p.is_file()}
