"""The job queue: one worker thread owns the pipeline and runs jobs in submission order.

Every API submits here. Live state (progress, step preview) lives in memory; the history
database and the PNG files are the record. Cancellation is cooperative: the step callback
raises `Cancelled` between denoising steps."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from bonsai.images import save_png
from bonsai.pipeline import InvalidRequest

from .db import JobDB
from .errors import QueueFull
from .runner import Runner, preview_png
from .spec import JobSpec

log = logging.getLogger("bonsai.serve")


class Cancelled(Exception):
    """Raised inside the step callback to stop a job between steps."""


@dataclass
class Job:
    """A queued or running job's live state (finished jobs are read back from the database)."""

    id: str
    spec: JobSpec
    source: str
    init: Image.Image | None = field(default=None, repr=False)
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    stage: int = 0
    stages: int = 1
    step: int = 0
    total: int = 0
    preview: bytes | None = field(default=None, repr=False)
    error: str | None = None
    invalid: bool = False  # failed because of the request (the pipeline refused it), not the server
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def fraction(self) -> float:
        if self.status != "running" or not self.total:
            return 0.0
        return ((self.stage - 1) + self.step / self.total) / self.stages

    async def wait(self, timeout: float, poll_s: float = 0.05) -> bool:
        """Wait on the event loop (without holding a thread) until the job ends; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.done.is_set():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(poll_s)
        return True


def image_path(images_dir: Path, job_id: str, n: int) -> Path:
    return images_dir / f"{job_id}-{n}.png"


class JobQueue:
    def __init__(self, db: JobDB, images_dir: Path, runner: Runner, max_queue: int, preview_side: int = 128):
        self.db = db
        self.images_dir = images_dir
        self.runner = runner
        self.max_queue = max_queue
        self.preview_side = preview_side
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._live: dict[str, Job] = {}
        self._order: list[str] = []  # ids of queued jobs, oldest first
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.current: Job | None = None

    def start(self) -> None:
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._work, name="bonsai-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is queued or running (recorded as interrupted) and end the worker."""
        with self._lock:
            jobs = list(self._live.values())
        for job in jobs:
            job.error = "the server stopped before this job finished"
            job.cancel.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, spec: JobSpec, init: Image.Image | None, source: str) -> Job:
        """Queue a job; QueueFull when `max_queue` jobs are already waiting."""
        job = Job(uuid.uuid4().hex, spec, source, init, stages=2 if spec.hires else 1)
        with self._lock:
            if len(self._order) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} jobs already; retry later")
            self.db.insert(job.id, source, spec.to_json(), job.created)
            self._live[job.id] = job
            self._order.append(job.id)
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._live.get(job_id)

    def position(self, job_id: str) -> int | None:
        """0-based place among the waiting jobs, or None if the job is not waiting."""
        with self._lock:
            return self._order.index(job_id) if job_id in self._order else None

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._order)

    def cancel(self, job_id: str) -> bool:
        """Stop a job: a waiting one at once, a running one after its current step. False if it is not live."""
        with self._lock:
            job = self._live.get(job_id)
            if job is None:
                return False
            job.cancel.set()
            if job_id not in self._order:
                return True
            self._order.remove(job_id)
            self._live.pop(job_id)
        self._finish(job, "cancelled")
        job.init = None
        job.done.set()
        return True

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.id not in self._order:
                    continue  # cancelled while it waited
                self._order.remove(job.id)
            try:
                self._run(job)
            except Exception:  # the worker must outlive any one job
                log.exception("job %s: unexpected failure", job.id)
            finally:
                with self._lock:
                    self._live.pop(job.id, None)
                job.init = None
                job.done.set()

    def _finish(self, job: Job, status: str, params: list[str] = (), error: str | None = None,
                warnings: list[str] = ()) -> None:
        # The history row first: a reader that sees the new status must find its parameters.
        self.db.finished(job.id, status, time.time(), params, error, warnings)
        job.status, job.error = status, error

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            self._finish(job, "interrupted" if job.error else "cancelled", error=job.error)
            return
        job.status, job.started = "running", time.time()
        self.db.started(job.id, job.started)
        self.current = job

        def progress(stage: int, stages: int, step: int, total: int, x0: torch.Tensor) -> None:
            if job.cancel.is_set():
                raise Cancelled
            job.preview = preview_png(x0, self.preview_side)
            job.stage, job.stages, job.step, job.total = stage, stages, step, total

        try:
            images, warnings = self.runner.run(job.spec, job.init, progress)
            for n, image in enumerate(images):
                save_png(image, image_path(self.images_dir, job.id, n))
            self._finish(job, "done", [im.info.get("parameters", "") for im in images], warnings=warnings)
        except Cancelled:
            self._finish(job, "interrupted" if job.error else "cancelled", error=job.error)
        except InvalidRequest as exc:
            job.invalid = True
            self._finish(job, "failed", error=str(exc))
        except Exception as exc:
            log.exception("job %s failed", job.id)
            self._finish(job, "failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.current = None
