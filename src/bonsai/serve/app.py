"""The FastAPI application: the APIs, the web UI, error handling, auth and limits.

    app = create_app(ServeConfig(data_dir=Path("serve-data")))
    uvicorn.run(app, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from . import a1111, native, openai
from .config import ServeConfig
from .errors import FieldError, QueueFull
from .hosts import HostCheck, host_policy
from .middleware import BodyLimit, CrossOriginGuard, TokenAuth, allowed_origin_set
from .runner import PipelineLoader
from .state import Server

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger("bonsai.serve")


def error_response(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """One error shape for every API: OpenAI clients read error.message, others error.field or detail."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": field, "field": field, "code": None}, "detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":  # its loc is ("body", character offset), not a field
        reason = first.get("ctx", {}).get("error", "JSON decode error")
        return error_response(422, "body", f"body is not valid JSON: {reason} at character {first['loc'][-1]}")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = ".".join(loc) or "body"
    return error_response(422, field, f"{field}: {first.get('msg', 'invalid value')}")


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Routing's own errors (no such path, a method the path does not take) in the shape of every other error."""
    if exc.status_code == 404:
        message = f"{request.method} {request.url.path}: no such endpoint on this server (see /docs)"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("allow")
        message = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, None, message, exc.headers)


def create_app(config: ServeConfig, loader: PipelineLoader | None = None) -> FastAPI:
    """The app for `config`; `loader(path, device)` replaces Pipeline.from_pretrained (tests share one model).
    ValueError when config.allowed_origins or config.allowed_hosts hold something that is not an origin or a host name."""
    origins = allowed_origin_set(config.allowed_origins)
    hosts = host_policy(config.host, config.allowed_hosts)
    state = Server.create(config, loader)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        interrupted = state.db.mark_interrupted()
        if interrupted:
            log.warning("%d job(s) were interrupted by the last shutdown; they are marked so in the history", interrupted)
        state.queue.start()
        try:
            yield
        finally:
            state.queue.stop()
            state.db.close()

    # FastAPI's /docs loads Swagger UI from a CDN and is blank offline; this one serves the copy that the
    # fastapi-offline package ships (under /static-offline-docs). No /redoc: ReDoc still fetches its logo from the web.
    app = FastAPIOffline(
        redoc_url=None,
        title="Bonsai",
        summary="Local text-to-image generation with 1-bit diffusion models",
        description="Native job API (/api), an AUTOMATIC1111-compatible subset (/sdapi/v1) and an "
        "OpenAI-compatible image endpoint (/v1). All share one job queue.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.bonsai = state
    app.add_exception_handler(
        FieldError, lambda _r, e: error_response(e.status, e.field, e.message)  # type: ignore[arg-type]
    )
    app.add_exception_handler(
        QueueFull, lambda _r, e: error_response(429, None, str(e), {"retry-after": "5"})  # type: ignore[arg-type]
    )
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    for module in (native, a1111, openai):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        # Opened as /?token=T: TokenAuth has kept the token in a cookie; drop it from the address bar.
        if config.token and "token" in request.query_params:
            return RedirectResponse("/", status_code=303)
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.token:
        app.add_middleware(TokenAuth, token=config.token)
    # Checked before the token: a page of another port on the same host gets the SameSite cookie sent along.
    app.add_middleware(CrossOriginGuard, allowed=origins)
    # Outermost: a request addressed to a foreign name (DNS rebinding) is refused before anything reads its body.
    if hosts is not None:
        app.add_middleware(HostCheck, policy=hosts)
    return app
