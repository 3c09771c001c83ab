"""An OpenAI-compatible POST /v1/images/generations (and GET /v1/models) for OpenAI clients."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict, Field

from .errors import FieldError, FieldNames
from .spec import JobRequest, NullMeansUnset, parse_size
from .state import Server, server

router = APIRouter(prefix="/v1", tags=["openai"])

# Our field names -> OpenAI's, for errors' fields and messages (a size's sides are named within it).
NAMES = FieldNames(
    {"batch": "n", "width": "size", "height": "size"}, {"batch": "n", "width": "size's width", "height": "size's height"}
)


class ImagesRequest(NullMeansUnset):
    """OpenAI's image generation body. quality, style, user and the like are accepted and ignored; null: the default."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 64x64; 'auto' or unset: the model's native size")
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None


@router.post("/images/generations")
async def generations(body: ImagesRequest, request: Request, s: Server = Depends(server)) -> dict[str, Any]:
    """Generate `n` images; `url` answers point at /api/jobs/{id}/images/{n} on this server."""
    width = height = None
    if body.size and body.size != "auto":
        width, height = parse_size(body.size)
    req = JobRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model, width=width, height=height,
        batch=body.n, seed=body.seed, steps=body.steps,
    )
    try:
        job = s.submit(req, "openai")
    except FieldError as exc:
        raise NAMES.translate(exc) from None
    rec = await s.finished(job)
    base = str(request.base_url).rstrip("/")
    if body.response_format == "url":
        data = [{"url": f"{base}/api/jobs/{rec.id}/images/{n}"} for n in range(rec.images)]
    else:
        data = [{"b64_json": s.image_b64(rec.id, n)} for n in range(rec.images)]
    for item in data:
        item["revised_prompt"] = body.prompt
    return {"created": int(time.time()), "data": data}


@router.get("/models")
def models(s: Server = Depends(server)) -> dict[str, Any]:
    usable = [m for m in s.catalog.list() if m.status == "ok"]
    return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "local"} for m in usable]}
