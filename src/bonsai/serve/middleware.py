"""ASGI middleware: request body size limit and token authentication."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_COOKIE = "bonsai_token"


async def _json_error(send: Send, status: int, field: str | None, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": {"message": message, "field": field, "type": "invalid_request_error"}, "detail": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Answers 413 to requests whose body is larger than `max_bytes`, declared or streamed
    (400 to a declared length that is not a number).

    The body is read (up to the limit) before the app sees the request, so an oversized upload
    is refused before anything parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is larger than {self.max_bytes} bytes"
        for name, value in scope["headers"]:
            if name != b"content-length":
                continue
            if not value.isdigit():
                return await _json_error(send, 400, "content-length", f"Content-Length {value.decode('latin-1')!r} is not a number of bytes")
            if int(value) > self.max_bytes:
                return await _json_error(send, 413, "body", message)
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await _json_error(send, 413, "body", message)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


API_PREFIXES = ("/api", "/sdapi", "/v1")
TOKEN_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Bonsai: token needed</title></head>
<body><h1>This Bonsai server needs a token</h1>
<p>Open <code>/?token=TOKEN</code>, TOKEN being the server's token (its <code>--token</code> option
or <code>BONSAI_TOKEN</code>); this browser then keeps it.</p></body></html>
"""


def _wants_page(scope: Scope) -> bool:
    """A browser opening a page (not an API route): it gets HTML that a person can read."""
    path = scope["path"]
    if any(path == prefix or path.startswith(prefix + "/") for prefix in API_PREFIXES):
        return False
    return b"text/html" in dict(scope["headers"]).get(b"accept", b"")


async def _html_401(send: Send, challenge: tuple[bytes, bytes]) -> None:
    headers = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(TOKEN_PAGE)).encode()), challenge]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": TOKEN_PAGE})


def request_tokens(scope: Scope) -> list[str]:
    """The tokens a request carries: Bearer header, Basic password (A1111 --api-auth style), cookie, ?token=.
    All of them count: a browser may still hold the cookie of a token the server no longer has."""
    headers = dict(scope["headers"])
    found = []
    auth = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value:
        found.append(value.strip())
    if scheme.lower() == "basic" and value:
        try:
            found.append(base64.b64decode(value.strip()).decode().partition(":")[2])
        except (binascii.Error, UnicodeDecodeError):
            pass
    cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
    if TOKEN_COOKIE in cookie:
        found.append(cookie[TOKEN_COOKIE].value)
    query = _query_token(scope)
    return found if query is None else [*found, query]


def _query_token(scope: Scope) -> str | None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("token", [None])[0]


def token_cookie(token: str) -> bytes:
    """The Set-Cookie value that keeps `token` for a browser's later requests: hidden from scripts, same site only."""
    cookie: SimpleCookie = SimpleCookie()
    cookie[TOKEN_COOKIE] = token
    cookie[TOKEN_COOKIE]["path"] = "/"
    cookie[TOKEN_COOKIE]["httponly"] = True
    cookie[TOKEN_COOKIE]["samesite"] = "strict"
    return cookie.output(header="").strip().encode("latin-1")


class TokenAuth:
    """Every HTTP request must carry `token`; 401 otherwise (compared in constant time).

    A request that carries it as ?token= (a bookmarked page) gets it back as a cookie, so that the
    page's own requests (the API docs' fetch of /openapi.json, the web UI's calls) carry it too."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.token = token.encode()
        self.cookie = token_cookie(token)

    def _matches(self, given: str | None) -> bool:
        return given is not None and secrets.compare_digest(given.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not any(self._matches(given) for given in request_tokens(scope)):
            challenge = (b"www-authenticate", b'Bearer realm="bonsai"')
            if _wants_page(scope):
                return await _html_401(send, challenge)
            return await _json_error(
                send, 401, "token", "missing or wrong token: send 'Authorization: Bearer TOKEN' (or open /?token=TOKEN in a browser)",
                [challenge],
            )
        if not self._matches(_query_token(scope)):
            return await self.app(scope, receive, send)

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", self.cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)
