"""The server's state shared by every API: settings, model catalog, history, job queue."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request

from .config import ServeConfig
from .db import JobDB, JobRecord
from .errors import FieldError
from .jobs import Job, JobQueue, image_path
from .models import ModelCatalog
from .runner import PipelineLoader, Runner
from .spec import JobRequest, resolve

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Server:
    config: ServeConfig
    catalog: ModelCatalog
    db: JobDB
    queue: JobQueue

    @classmethod
    def create(cls, config: ServeConfig, loader: PipelineLoader | None = None) -> "Server":
        catalog = ModelCatalog(config.home, config.models, config.default_model)
        db = JobDB(config.data_dir / "jobs.sqlite3")
        runner = Runner(catalog, config.device, loader)
        queue = JobQueue(db, config.data_dir / "images", runner, config.max_queue, config.preview_side)
        return cls(config, catalog, db, queue)

    def submit(self, req: JobRequest, source: str) -> Job:
        """Validate and queue; FieldError or QueueFull go back to the client as 4xx."""
        spec, init = resolve(req, self.catalog, self.config)
        return self.queue.submit(spec, init, source)

    def record(self, job_id: str) -> JobRecord:
        """The stored job with this id; FieldError (404) for a malformed or unknown id."""
        if not JOB_ID.match(job_id):
            raise FieldError("job_id", f"job id {job_id!r} is not 32 hex digits", 404)
        rec = self.db.get(job_id)
        if rec is None:
            raise FieldError("job_id", f"no job {job_id}", 404)
        return rec

    def image_file(self, job_id: str, n: int) -> Path:
        """The PNG of image `n` of a finished job (ids and indices only: never a client path)."""
        rec = self.record(job_id)
        if not 0 <= n < rec.images:
            raise FieldError("n", f"job {job_id} has {rec.images} image(s); there is no image {n}", 404)
        path = image_path(self.queue.images_dir, job_id, n)
        if not path.is_file():
            raise FieldError("n", f"image {n} of job {job_id} is no longer on disk", 404)
        return path

    def image_b64(self, job_id: str, n: int) -> str:
        return base64.b64encode(self.image_file(job_id, n).read_bytes()).decode()

    async def finished(self, job: Job) -> JobRecord:
        """Wait for `job` (a blocking A1111/OpenAI request) and return its record; FieldError unless it is done."""
        if not await job.wait(self.config.sync_timeout_s):
            # the job goes on (queued or running); its result will be at /api/jobs/{id}
            raise FieldError("job", f"job {job.id} did not finish within {self.config.sync_timeout_s:g} s; it is still "
                             f"{job.status} (see /api/jobs/{job.id})", 504)
        rec = self.record(job.id)
        if rec.status == "done":
            return rec
        if rec.status == "failed":
            raise FieldError("job", rec.error or "generation failed", 422 if job.invalid else 500)
        raise FieldError("job", f"job {job.id} was {rec.status}" + (f": {rec.error}" if rec.error else ""), 409)

    def describe(self, rec: JobRecord, base: str = "") -> dict[str, Any]:
        """A job as JSON: the stored record, overlaid with live progress while it is queued or running."""
        live = self.queue.get(rec.id)
        status = live.status if live is not None else rec.status
        doc: dict[str, Any] = {
            "id": rec.id,
            "status": status,
            "source": rec.source,
            "spec": rec.spec,
            "created": rec.created,
            "started": live.started if live is not None else rec.started,
            "finished": rec.finished,
            "error": rec.error,
            "warnings": rec.warnings,
            "images": [f"{base}/api/jobs/{rec.id}/images/{n}" for n in range(rec.images)],
            "parameters": rec.params,
        }
        if live is not None:
            doc["position"] = self.queue.position(rec.id)
            doc["progress"] = {
                "stage": live.stage, "stages": live.stages, "step": live.step, "total": live.total, "fraction": live.fraction,
            }
            doc["preview"] = f"{base}/api/jobs/{rec.id}/preview?step={live.stage}.{live.step}" if live.preview else None
        return doc


def server(request: Request) -> Server:
    """FastAPI dependency: the Server of the app handling `request`."""
    return request.app.state.bonsai
