"""An AUTOMATIC1111-compatible subset of /sdapi/v1 so that existing clients (e.g. `webuiapi`) work.

Requests block until their job ends (as in A1111) but run through the shared queue."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import ConfigDict, Field, ValidationError

from bonsai.limits import HIRES_STRENGTH
from bonsai.sampling import SAMPLERS

from .errors import FieldError, FieldNames
from .spec import HiresRequest, JobRequest, NullMeansUnset
from .state import Server, server

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])

# A1111 sampler names -> ours. Ancestral Euler has no flow-matching counterpart; plain Euler is the nearest.
SAMPLER_NAMES = {"euler": "euler", "euler a": "euler", "heun": "heun", "dpm++ 2m": "dpmpp_2m", "dpm++ 2m karras": "dpmpp_2m"}
SAMPLER_TITLES = {"euler": "Euler", "heun": "Heun", "dpmpp_2m": "DPM++ 2M"}
# Our field names -> A1111's, so errors name the field the client sent.
FIELD_NAMES = {
    "cfg": "cfg_scale", "batch": "batch_size", "sampler": "sampler_name", "init_image": "init_images",
    "strength": "denoising_strength", "hires.scale": "hr_scale", "hires.steps": "hr_second_pass_steps",
    "hires.strength": "denoising_strength", "hires.upscaler": "hr_upscaler", "model": "override_settings.sd_model_checkpoint",
}
# ...and how their messages name them: a batch is batch_size * n_iter; "model" stays, since it is also a
# plain word there (a checkpoint's load error) and the error's field already names the A1111 one.
MESSAGE_NAMES = {**{k: v for k, v in FIELD_NAMES.items() if k != "model"}, "batch": "batch_size * n_iter"}
NAMES = FieldNames(FIELD_NAMES, MESSAGE_NAMES)
# Every A1111 upscaler name maps to the pixel LANCZOS pass (latent upscaling is not implemented).
UPSCALER_NAMES = {"latent", "latent (antialiased)", "latent (bicubic)", "latent (nearest)", "lanczos", "none", ""}


class Txt2ImgRequest(NullMeansUnset):
    """The fields of A1111's txt2img body that Bonsai uses; the rest are accepted and ignored. null: the default."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    denoising_strength: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None  # inpainting, which Bonsai does not do: refused rather than ignored


def _sampler(name: str | None) -> str | None:
    if name is None:
        return None
    key = name.strip().lower()
    if key in SAMPLER_NAMES or key in SAMPLERS:
        return SAMPLER_NAMES.get(key, key)
    known = ", ".join(sorted({*SAMPLER_TITLES.values(), "Euler a"}))
    raise FieldError("sampler_name", f"sampler_name {name!r} is not one of {known}")


def _field_error(exc: ValidationError, prefix: str = "") -> FieldError:
    """The first error of a native request built from an A1111 body, named as the A1111 field."""
    first = exc.errors()[0]
    field = prefix + ".".join(str(p) for p in first["loc"])
    name = NAMES.field(field)
    return FieldError(name, f"{name}: {first['msg']}")


def _hires_scale(body: Txt2ImgRequest, model: str | None, s: Server) -> float:
    """hr_scale, or, as A1111 takes it first, the target size hr_resize_x / hr_resize_y (either may be 0:
    it follows the first pass's shape) as a scale of the first pass's size."""
    x, y = body.hr_resize_x, body.hr_resize_y
    if not x and not y:
        return body.hr_scale
    try:
        defaults = s.catalog.get(model).defaults
    except FieldError as exc:
        raise NAMES.translate(exc) from None
    width, height = body.width or int(defaults["width"]), body.height or int(defaults["height"])
    field = "hr_resize_x" if x else "hr_resize_y"
    if x and y and x * height != y * width:  # A1111 would upscale to cover it and crop; the hires pass does not crop
        raise FieldError(field, f"hr_resize_x x hr_resize_y {x}x{y} is not the shape of the first pass's {width}x{height}: "
                         "give one of them (the other follows) or hr_scale")
    scale = x / width if x else y / height
    if scale <= 1:
        raise FieldError(field, f"{field} {x or y} does not enlarge the first pass's {width}x{height}")
    if scale > s.config.max_hires_scale:  # checked here too, so that the message names the field the client sent
        raise FieldError(field, f"{field} {x or y} is {scale:g}x the first pass's {width}x{height}; at most {s.config.max_hires_scale:g}x is allowed")
    return scale


def _to_job(body: Txt2ImgRequest, s: Server, init_image: str | None = None) -> JobRequest:
    model = body.override_settings.get("sd_model_checkpoint") or s.catalog.default_name
    hires = None
    if body.enable_hr and init_image is None:
        if (body.hr_upscaler or "").strip().lower() not in UPSCALER_NAMES:
            raise FieldError("hr_upscaler", f"hr_upscaler {body.hr_upscaler!r} is not available; use Lanczos")
        try:
            hires = HiresRequest(
                scale=_hires_scale(body, model, s), strength=body.denoising_strength or HIRES_STRENGTH, steps=body.hr_second_pass_steps or None
            )
        except ValidationError as exc:
            raise _field_error(exc, "hires.") from None
    try:
        return JobRequest(
            prompt=body.prompt, negative_prompt=body.negative_prompt, seed=body.seed, steps=body.steps, cfg=body.cfg_scale,
            width=body.width, height=body.height, batch=body.batch_size * body.n_iter,
            sampler=_sampler(body.sampler_name or body.sampler_index),
            model=model,
            init_image=init_image, strength=body.denoising_strength if init_image is not None else None, hires=hires,
        )
    except ValidationError as exc:
        raise _field_error(exc) from None


async def _generate(req: JobRequest, s: Server, echo: dict[str, Any]) -> dict[str, Any]:
    try:
        job = s.submit(req, "a1111")
    except FieldError as exc:
        raise NAMES.translate(exc) from None
    try:
        rec = await s.finished(job)
    except FieldError:
        if s.record(job.id).status != "cancelled":
            raise
        # Interrupted (/sdapi/v1/interrupt): A1111 answers such a call with what it has, not an error, and its
        # clients take an error for a failure. Bonsai stops at once, so there is no image to give.
        return {"images": [], "parameters": echo, "info": json.dumps({"job_id": job.id, "interrupted": True})}
    spec = rec.spec
    seeds = [spec["seed"] + i for i in range(rec.images)]
    info = {
        "job_id": rec.id, "prompt": spec["prompt"], "all_prompts": [spec["prompt"]] * rec.images,
        "negative_prompt": spec["negative_prompt"], "seed": spec["seed"], "all_seeds": seeds,
        "width": (spec["hires"] or spec)["width"], "height": (spec["hires"] or spec)["height"],
        "sampler_name": SAMPLER_TITLES.get(spec["sampler"], spec["sampler"]), "cfg_scale": spec["cfg"],
        "steps": spec["steps"], "batch_size": rec.images, "sd_model_name": spec["model"], "infotexts": rec.params,
        "warnings": rec.warnings,  # not A1111's: what the generation warned of (a prompt cut short, black images)
    }
    return {"images": [s.image_b64(rec.id, n) for n in range(rec.images)], "parameters": echo, "info": json.dumps(info)}


@router.post("/txt2img")
async def txt2img(body: Txt2ImgRequest, s: Server = Depends(server)) -> dict[str, Any]:
    return await _generate(_to_job(body, s), s, body.model_dump())


@router.post("/img2img")
async def img2img(body: Img2ImgRequest, s: Server = Depends(server)) -> dict[str, Any]:
    if not body.init_images:
        raise FieldError("init_images", "init_images needs one base64 image")
    if body.mask:  # ignored, the whole image would be redrawn where the client asked for the masked part only
        raise FieldError("mask", "mask: inpainting is not supported; send img2img without a mask to redraw the whole image")
    echo = body.model_dump(exclude={"init_images", "mask"})
    return await _generate(_to_job(body, s, body.init_images[0]), s, echo)


@router.get("/sd-models")
def sd_models(s: Server = Depends(server)) -> list[dict[str, Any]]:
    return [
        {"title": m.name, "model_name": m.name, "hash": None, "sha256": None, "filename": m.path.name, "config": None}
        for m in s.catalog.list() if m.status == "ok"
    ]


@router.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    return [{"name": SAMPLER_TITLES.get(n, n), "aliases": [n], "options": {}} for n in SAMPLERS]


@router.get("/scripts")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/options")
def get_options(s: Server = Depends(server)) -> dict[str, Any]:
    default = s.catalog.default()
    return {"sd_model_checkpoint": default.name if default else None}


@router.post("/options")
def set_options(body: dict[str, Any], s: Server = Depends(server)) -> None:
    """Only `sd_model_checkpoint` is honoured: it sets the model used when a request names none."""
    name = body.get("sd_model_checkpoint")
    if name is not None:
        try:
            s.catalog.default_name = s.catalog.get(str(name)).name
        except FieldError as exc:
            raise FieldError("sd_model_checkpoint", exc.message) from None


@router.get("/progress")
def progress(s: Server = Depends(server)) -> dict[str, Any]:
    """The running job's progress, an ETA from its speed so far, and its latest step preview."""
    job = s.queue.current
    waiting = s.queue.waiting
    if job is None or job.started is None:
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": waiting, "sampling_step": 0, "sampling_steps": 0}
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    elapsed = time.time() - job.started
    eta = elapsed * (1 - job.fraction) / job.fraction if job.fraction > 0 else 0.0
    state = {
        "skipped": False, "interrupted": job.cancel.is_set(), "job": job.id, "job_count": waiting + 1,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started)),
        "sampling_step": job.step, "sampling_steps": job.total,
    }
    preview = job.preview
    current = base64.b64encode(preview).decode() if preview else None
    return {"progress": job.fraction, "eta_relative": eta, "state": state, "current_image": current, "textinfo": None}


@router.post("/interrupt")
def interrupt(s: Server = Depends(server)) -> dict[str, bool]:
    """Cancel the running job (A1111's Interrupt button)."""
    job = s.queue.current
    return {"interrupted": job is not None and s.queue.cancel(job.id)}
