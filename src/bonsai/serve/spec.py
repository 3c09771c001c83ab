"""The native job request, its validation, and the resolved job spec that the worker runs.

Every API (native, A1111, OpenAI) builds a `JobRequest`; `resolve` checks it against the
server's limits and the chosen model and fills every unset field from the model's defaults,
so that the stored spec alone reproduces the job."""

from __future__ import annotations

import base64
import binascii
import io
import re
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bonsai.hires import UPSCALERS, hires_size
from bonsai.images import flatten_on_white
from bonsai.limits import CFG_RANGE, HIRES_STRENGTH, IMG2IMG_STRENGTH, MAX_PROMPT_CHARS, last_seed
from bonsai.lora import LoRAError, parse_prompt_loras
from bonsai.sampling import SAMPLERS, img2img_timesteps

from .config import ServeConfig
from .errors import FieldError
from .models import ModelCatalog, ModelInfo

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class NullMeansUnset(BaseModel):
    """A compatible API's body: null stands for an unset field, as A1111 (whose fields are all Optional)
    and OpenAI (n, size, response_format... are nullable) take it; their clients send it so."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=200)
    weight: float = Field(1.0, ge=-4.0, le=4.0)


class HiresRequest(BaseModel):
    """Second pass: upscale the first result by `scale`, then refine it with img2img at `strength`."""

    model_config = ConfigDict(extra="forbid")
    scale: float = Field(2.0, gt=1.0)
    strength: float = Field(HIRES_STRENGTH, gt=0.0, le=1.0)
    steps: int | None = Field(None, description="second-pass steps (default: the first pass's)")
    upscaler: str = "lanczos"


class JobRequest(BaseModel):
    """A generation job. Unset fields take the model's defaults; seed null or -1 draws one."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    negative_prompt: str = ""
    model: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None
    sampler: str | None = None
    batch: int = 1
    loras: list[LoraRef] = Field(default_factory=list, max_length=8)
    init_image: str | None = Field(None, description="img2img source: base64 PNG/JPEG/WebP (a data: URL is fine)")
    strength: float | None = Field(None, description=f"img2img denoising strength in (0, 1]; default {IMG2IMG_STRENGTH:g}")
    hires: HiresRequest | None = None


@dataclass(frozen=True)
class HiresSpec:
    scale: float
    strength: float
    steps: int
    upscaler: str
    width: int
    height: int


@dataclass(frozen=True)
class JobSpec:
    """A fully resolved job: what the worker runs and what the history stores."""

    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg: float
    seed: int
    sampler: str
    batch: int
    strength: float = 1.0
    img2img: bool = False
    loras: tuple[tuple[str, float], ...] = ()
    hires: HiresSpec | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """base64 (or data: URL) -> RGB image (transparent parts over white); FieldError naming `field` when it is not a small image."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:  # whitespace is dropped (MIME-style base64 breaks lines every 76 characters); other stray characters are refused
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, f"{field} is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > max_pixels:
                raise FieldError(field, f"{field} is {im.width}x{im.height}; at most {max_pixels} pixels are accepted")
            if im.format not in ("PNG", "JPEG", "WEBP"):
                raise FieldError(field, f"{field} must be a PNG, JPEG or WebP image, got {im.format}")
            return flatten_on_white(ImageOps.exif_transpose(im))  # upright, as its EXIF orientation says
    except (OSError, Image.DecompressionBombError, SyntaxError):
        raise FieldError(field, f"{field} is not a readable image") from None


def parse_size(size: str, field: str = "size") -> tuple[int, int]:
    m = _SIZE.match(size.strip().lower())
    if not m:
        raise FieldError(field, f"{field} {size!r} is not WIDTHxHEIGHT, e.g. 512x512")
    return int(m.group(1)), int(m.group(2))


def _side_limit(model: ModelInfo, cfg: ServeConfig) -> tuple[int, str]:
    """The largest width or height of a job with `model` on this server, and why it is that."""
    if model.max_side < cfg.max_side:
        return model.max_side, model.size_limit_reason
    return cfg.max_side, f"this server draws up to {cfg.max_side} px per side"


def _check_side(field: str, value: int, model: ModelInfo, cfg: ServeConfig) -> None:
    step = model.size_step
    limit, reason = _side_limit(model, cfg)
    if not step <= value <= limit or value % step:
        why = f"; {reason}" if value > limit else ""
        raise FieldError(field, f"{field} {value} is not allowed: use a multiple of {step} between {step} and {limit}{why}")


def _check_img2img_steps(strength_field: str, strength: float, steps_field: str, steps: int, shift: float) -> None:
    """Refuse a strength that leaves no step of the schedule (the pipeline would fail only once the job runs)."""
    if len(img2img_timesteps(steps, strength, shift)) < 2:
        raise FieldError(
            strength_field, f"{strength_field} {strength:g} leaves no step to run with {steps_field} {steps}: raise {steps_field} or {strength_field}"
        )


def resolve(req: JobRequest, catalog: ModelCatalog, cfg: ServeConfig) -> tuple[JobSpec, Image.Image | None]:
    """Check `req` and fill its defaults -> (spec, decoded init image or None); FieldError on the first bad field."""
    model = catalog.get(req.model)
    d = model.defaults
    if not req.prompt.strip():
        raise FieldError("prompt", "prompt is empty: describe the image you want")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if len(text) > MAX_PROMPT_CHARS:
            raise FieldError(name, f"{name} is longer than {MAX_PROMPT_CHARS} characters")
        try:  # JSON allows lone surrogates (\ud800); UTF-8 does not, and no response could echo them
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise FieldError(name, f"{name} is not valid Unicode text: it holds a lone surrogate (\\ud800-\\udfff)") from None
    width = req.width if req.width is not None else int(d["width"])
    height = req.height if req.height is not None else int(d["height"])
    _check_side("width", width, model, cfg)
    _check_side("height", height, model, cfg)
    steps = req.steps if req.steps is not None else int(d.get("steps", 20))
    if not 1 <= steps <= cfg.max_steps:
        raise FieldError("steps", f"steps must be between 1 and {cfg.max_steps}, got {steps}")
    guidance = req.cfg if req.cfg is not None else float(d.get("cfg", 4.0))
    if not CFG_RANGE[0] <= guidance <= CFG_RANGE[1]:
        raise FieldError("cfg", f"cfg must be between {CFG_RANGE[0]:g} and {CFG_RANGE[1]:g}, got {guidance:g}")
    shift = float(d.get("shift", 1.0))  # the schedule's, as the pipeline reads it from the same defaults
    sampler = req.sampler or str(d.get("sampler", "euler"))
    if sampler not in SAMPLERS:
        raise FieldError("sampler", f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if not 1 <= req.batch <= cfg.max_batch:
        raise FieldError("batch", f"batch must be between 1 and {cfg.max_batch}, got {req.batch}")
    top = last_seed(req.batch)
    seed = secrets.randbelow(top + 1) if req.seed is None or req.seed == -1 else req.seed
    if not 0 <= seed <= top:
        raise FieldError("seed", f"seed must be -1 (random) or between 0 and {top}, got {seed}")

    hires = None
    if req.hires is not None:
        h = req.hires
        if h.scale > cfg.max_hires_scale:
            raise FieldError("hires.scale", f"hires.scale must be at most {cfg.max_hires_scale:g}, got {h.scale:g}")
        if h.upscaler not in UPSCALERS:
            raise FieldError("hires.upscaler", f"hires.upscaler {h.upscaler!r} is not one of {', '.join(UPSCALERS)}")
        hires_steps = h.steps if h.steps is not None else steps
        if not 1 <= hires_steps <= cfg.max_steps:
            raise FieldError("hires.steps", f"hires.steps must be between 1 and {cfg.max_steps}, got {hires_steps}")
        _check_img2img_steps("hires.strength", h.strength, "hires.steps", hires_steps, shift)
        hw, hh = hires_size(width, height, h.scale, model.size_step)
        limit, reason = _side_limit(model, cfg)
        if max(hw, hh) > limit:
            raise FieldError(
                "hires.scale", f"hires.scale {h.scale:g} turns {width}x{height} into {hw}x{hh}, but {reason}; lower hires.scale or the size"
            )
        hires = HiresSpec(h.scale, h.strength, hires_steps, h.upscaler, hw, hh)
    final_w, final_h = (hires.width, hires.height) if hires else (width, height)
    if req.batch * final_w * final_h > cfg.max_pixels:
        raise FieldError(
            "batch", f"batch {req.batch} of {final_w}x{final_h} exceeds this server's {cfg.max_pixels} pixels per job; lower batch or size"
        )

    init = None
    strength = 1.0
    if req.init_image is not None:
        init = decode_image(req.init_image, "init_image", cfg.max_upload_pixels)
        strength = req.strength if req.strength is not None else IMG2IMG_STRENGTH
        if not 0.0 < strength <= 1.0:
            raise FieldError("strength", f"strength must be in (0, 1], got {strength:g}")
        _check_img2img_steps("strength", strength, "steps", steps, shift)
    elif req.strength is not None:
        raise FieldError("strength", "strength applies to img2img only: send init_image too")

    known = catalog.loras()
    for i, lora in enumerate(req.loras):
        if lora.name not in known:
            raise FieldError(f"loras.{i}.name", f"unknown LoRA {lora.name!r}; known: {', '.join(known) or 'none'} (see GET /api/loras)")
    try:
        _, tagged = parse_prompt_loras(req.prompt)
    except LoRAError as e:
        raise FieldError("prompt", str(e)) from None
    for name, _weight in tagged:  # checked here too, so that a bad tag is a 422 rather than a failed job
        if name not in known:
            raise FieldError("prompt", f"unknown LoRA {name!r} in the prompt; known: {', '.join(known) or 'none'} (see GET /api/loras)")
    spec = JobSpec(
        model=model.name, prompt=req.prompt, negative_prompt=req.negative_prompt, width=width, height=height,
        steps=steps, cfg=guidance, seed=seed, sampler=sampler, batch=req.batch, strength=strength,
        img2img=init is not None, loras=tuple((lo.name, lo.weight) for lo in req.loras), hires=hires,
    )
    return spec, init
