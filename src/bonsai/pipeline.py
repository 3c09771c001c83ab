"""Prompt -> images: encode the prompt, prepare noise, denoise with guidance, decode.

    pipe = Pipeline.from_pretrained("bonsai-emoji")
    images = pipe("grinning face", steps=20, cfg=4.0, seed=1)

Each image of a batch has its own seed (seed, seed + 1, ...) and its own noise generator, so
image i of a batch equals a single run with seed + i.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .sampling import SAMPLERS, cfg_velocity, flow_timesteps

MAX_STEPS = 1000
CFG_RANGE = (0.0, 50.0)
MAX_SIDE = 4096
MAX_PROMPT_CHARS = 2000

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step, total, denoised estimate)


@dataclass(frozen=True)
class GenerationParams:
    """Everything needed to reproduce one image."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg: float = 4.0
    seed: int = 0
    width: int = 64
    height: int = 64
    sampler: str = "euler"
    shift: float = 1.0
    model: str = ""

    def to_a1111(self) -> str:
        """The A1111 "parameters" text that image browsers and web UIs read back."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(
            f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.cfg:g}, Seed: {self.seed}, "
            f"Size: {self.width}x{self.height}, Model: {self.model}, Schedule shift: {self.shift:g}"
        )
        return "\n".join(lines)


@dataclass
class Generation:
    images: list[Image.Image]
    params: list[GenerationParams]
    samples: torch.Tensor = field(repr=False)  # decoded float samples [B, 3, H, W] in [-1, 1]


class InvalidRequest(ValueError):
    """A generation request with a bad field; the message names the field and the fix."""


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise InvalidRequest(f"device {device!r} is not one of auto, cpu, cuda, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequest("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def to_pil(samples: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB images."""
    arr = ((samples.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


class Pipeline:
    """A denoiser, a text encoder and a decoder, with the defaults its checkpoint recommends."""

    def __init__(self, denoiser: torch.nn.Module, text_encoder: Any, metadata: dict, device: torch.device, name: str = ""):
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.metadata = metadata
        self.device = device
        self.name = name or metadata.get("name", "")
        config = metadata["config"]
        pipe = metadata.get("pipeline", {})
        self.patch_size = config.get("patch_size", 1)
        self.channels = config.get("in_channels", 3)
        d = pipe.get("defaults", {})
        size = config.get("sample_size", 64)
        self.defaults = GenerationParams(
            prompt="",
            steps=d.get("steps", 20),
            cfg=d.get("cfg", 4.0),
            width=d.get("width", size),
            height=d.get("height", size),
            sampler=d.get("sampler", "euler"),
            shift=d.get("shift", 1.0),
            model=self.name,
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str] = "bonsai-emoji", device: str = "auto") -> "Pipeline":
        """Load a model by catalog name or file path (see `bonsai models list`)."""
        from .hub import resolve
        from .models import load_model
        from .text import TextEncoder

        path = resolve(str(name_or_path))
        dev = pick_device(device)
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        denoiser, meta = load_model(path, device="cpu", dtype=dtype)
        text_kind = meta.get("pipeline", {}).get("text_encoder", "minilm")
        if text_kind != "minilm":
            raise InvalidRequest(f"{path}: text encoder {text_kind!r} is not supported by this Bonsai")
        name = meta.get("name") or os.path.basename(str(path)).removesuffix(".safetensors")
        return cls(denoiser.to(dev), TextEncoder().to(dev), meta, dev, name)

    def check(self, params: GenerationParams, batch: int) -> None:
        """Raise InvalidRequest naming the first bad field."""
        factor = self.patch_size
        if not params.prompt.strip():
            raise InvalidRequest("prompt is empty: describe the image you want")
        if len(params.prompt) > MAX_PROMPT_CHARS or len(params.negative_prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        if not 1 <= params.steps <= MAX_STEPS:
            raise InvalidRequest(f"steps must be between 1 and {MAX_STEPS}, got {params.steps}")
        if not CFG_RANGE[0] <= params.cfg <= CFG_RANGE[1]:
            raise InvalidRequest(f"cfg must be between {CFG_RANGE[0]:g} and {CFG_RANGE[1]:g}, got {params.cfg:g}")
        for side, value in (("width", params.width), ("height", params.height)):
            if not factor <= value <= MAX_SIDE or value % factor:
                raise InvalidRequest(
                    f"{side} {value} must be a multiple of {factor} between {factor} and {MAX_SIDE} for this model"
                )
        if params.sampler not in SAMPLERS:
            raise InvalidRequest(f"sampler {params.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if batch < 1:
            raise InvalidRequest(f"batch must be >= 1, got {batch}")

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = self.text_encoder.encode(prompts)
        return states.to(self.device, self._dtype), mask.to(self.device)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def noise(self, params: GenerationParams, batch: int) -> torch.Tensor:
        """Per-image seeded noise [B, C, H, W], drawn on the CPU so every device gets the same."""
        shape = (self.channels, params.height, params.width)
        draws = [torch.randn(shape, generator=torch.Generator().manual_seed(params.seed + i)) for i in range(batch)]
        return torch.stack(draws).to(self.device, self._dtype)

    @torch.no_grad()
    def generate(self, prompt: str, batch: int = 1, callback: StepCallback | None = None, **overrides: Any) -> Generation:
        """Generate `batch` images; unset fields take the model's defaults. seed=None draws one."""
        fields_ = {k: v for k, v in overrides.items() if v is not None}
        if "seed" not in fields_:
            fields_["seed"] = secrets.randbelow(2**31)
        params = replace(self.defaults, prompt=prompt, **fields_)
        self.check(params, batch)

        cond = self._encode([params.prompt] * batch)
        uncond = self._encode([params.negative_prompt] * batch)
        model = cfg_velocity(self.denoiser, cond, uncond, params.cfg)
        timesteps = flow_timesteps(params.steps, params.shift)
        step_cb = None if callback is None else (lambda i, x, x0: callback(i + 1, params.steps, x0))
        samples = SAMPLERS[params.sampler](model, self.noise(params, batch), timesteps, step_cb)
        images = to_pil(samples)
        per_image = [replace(params, seed=params.seed + i) for i in range(batch)]
        for image, p in zip(images, per_image):
            image.info["parameters"] = p.to_a1111()
        return Generation(images, per_image, samples.float().cpu())

    def __call__(self, prompt: str, **kwargs: Any) -> list[Image.Image]:
        return self.generate(prompt, **kwargs).images
