"""The native JSON API under /api: submit, status, cancel, results, history, models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import FileResponse

from bonsai.limits import HIRES_STRENGTH, IMG2IMG_STRENGTH
from bonsai.sampling import SAMPLERS

from .config import SIZE_PRESETS
from .errors import FieldError
from .spec import UPSCALERS, JobRequest
from .state import Server, server

router = APIRouter(prefix="/api", tags=["native"])


@router.get("/health")
def health(s: Server = Depends(server)) -> dict[str, Any]:
    """Liveness: the worker thread is running; how many jobs wait."""
    return {"ok": s.queue.alive, "waiting": s.queue.waiting, "max_queue": s.config.max_queue}


@router.post("/jobs", status_code=202)
def submit(req: JobRequest, s: Server = Depends(server)) -> dict[str, Any]:
    """Queue a generation job; answers at once with its id (poll GET /api/jobs/{id})."""
    job = s.submit(req, "api")
    return {"id": job.id, "status": job.status, "position": s.queue.position(job.id), "spec": job.spec.to_json()}


@router.get("/jobs")
def history(
    limit: int = Query(50, ge=1, le=500),
    before: int | None = Query(None, ge=0, description="cursor from the previous page's `next`"),
    status: str | None = Query(None, pattern="^(queued|running|done|failed|cancelled|interrupted)$"),
    s: Server = Depends(server),
) -> dict[str, Any]:
    """Jobs, newest first, with their parameters and image URLs."""
    records, cursor = s.db.history(limit, before, status)
    return {"jobs": [s.describe(r) for r in records], "next": cursor}


@router.get("/jobs/{job_id}")
def status(job_id: str, s: Server = Depends(server)) -> dict[str, Any]:
    return s.describe(s.record(job_id))


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: str, s: Server = Depends(server)) -> dict[str, Any]:
    """Cancel a queued job at once or a running one after its current step (409 if it already ended)."""
    rec = s.record(job_id)
    if not s.queue.cancel(job_id):
        raise FieldError("job_id", f"job {job_id} already ended ({rec.status})", 409)
    return s.describe(s.record(job_id))


@router.get("/jobs/{job_id}/images/{n}", response_class=FileResponse)
def image(job_id: str, n: int, download: bool = False, s: Server = Depends(server)) -> FileResponse:
    """Image n of a finished job: the PNG with its parameters embedded."""
    path = s.image_file(job_id, n)
    disposition = "attachment" if download else "inline"
    return FileResponse(path, media_type="image/png", content_disposition_type=disposition, filename=f"bonsai-{job_id[:8]}-{n}.png")


@router.get("/jobs/{job_id}/preview")
def preview(job_id: str, s: Server = Depends(server)) -> Response:
    """The latest step preview (small PNG of the denoised estimate) of a running job; 204 when there is none."""
    s.record(job_id)
    job = s.queue.get(job_id)
    if job is None or job.preview is None:
        return Response(status_code=204)
    return Response(job.preview, media_type="image/png", headers={"cache-control": "no-store"})


@router.get("/models")
def models(s: Server = Depends(server)) -> dict[str, Any]:
    """Local models with size, parameters and bits per weight; `default` is what an unset model means."""
    default = s.catalog.default()
    return {"models": [m.to_json() for m in s.catalog.list()], "default": default.name if default else None}


@router.get("/loras")
def loras(s: Server = Depends(server)) -> dict[str, Any]:
    """LoRA files in $BONSAI_HOME/loras: a job's `loras`, or `<lora:NAME:WEIGHT>` in its prompt, apply them."""
    return {"loras": sorted(s.catalog.loras()), "folder": str(s.catalog.loras_dir)}


@router.get("/config")
def config(s: Server = Depends(server)) -> dict[str, Any]:
    """What the web UI needs: size presets, limits, samplers, upscalers, the denoising strengths' defaults."""
    c = s.config
    return {
        "size_presets": [f"{w}x{h}" for w, h in SIZE_PRESETS],
        "samplers": list(SAMPLERS),
        "upscalers": list(UPSCALERS),
        "defaults": {"strength": IMG2IMG_STRENGTH, "hires_strength": HIRES_STRENGTH},
        "limits": {
            "max_batch": c.max_batch, "max_side": c.max_side, "max_pixels": c.max_pixels, "max_steps": c.max_steps,
            "max_queue": c.max_queue, "max_body_bytes": c.max_body_bytes, "max_hires_scale": c.max_hires_scale,
        },
    }
