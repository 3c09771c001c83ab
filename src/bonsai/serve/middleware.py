"""ASGI middleware: request body size limit, token authentication, and the same-origin check on writes."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_COOKIE = "bonsai_token"


async def json_error(send: Send, status: int, field: str | None, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
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
                return await json_error(send, 400, "content-length", f"Content-Length {value.decode('latin-1')!r} is not a number of bytes")
            if int(value) > self.max_bytes:
                return await json_error(send, 413, "body", message)
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await json_error(send, 413, "body", message)
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
            return await json_error(
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


# Methods that change nothing on this server; a browser also withholds their answers from other origins' pages.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str | None:
    """`origin` as a browser writes it in an Origin header (scheme://host[:port], lower case, no default
    port), or None when it is not an http(s) origin ("null", a path, junk)."""
    parts = urlsplit(origin.strip())
    try:
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname  # hostname is lower case, IPv6 without brackets
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != DEFAULT_PORTS[scheme] else "")


def allowed_origin_set(origins: tuple[str, ...]) -> frozenset[str]:
    """The normalized origins ("*" stays: any); ValueError naming the first that is not an origin."""
    found = set()
    for origin in origins:
        normal = "*" if origin.strip() == "*" else normalize_origin(origin)
        if normal is None:
            raise ValueError(f"{origin!r} is not an origin: write scheme://host[:port], e.g. https://bonsai.example.org")
        found.add(normal)
    return frozenset(found)


class CrossOriginGuard:
    """Refuses (403) a state-changing request that a browser sent for a page of another origin.

    A web page can make the user's browser POST to this server without a CORS preflight (no body,
    or a form or text/plain body) and so interrupt or cancel jobs; the browser names that page in
    Origin (or, where it sends no Origin, marks the request Sec-Fetch-Site: cross-site or same-site).
    Such a request passes only when its origin is the server's own (the scheme and Host it was
    reached by: the web UI) or one of `allowed` (e.g. a reverse proxy's public address; "*": any).
    Clients that send neither header (curl, Python, A1111 and ComfyUI clients) are not concerned."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str] = frozenset()):
        self.app = app
        self.allowed = allowed

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> str | None:
        """Why the request is refused, or None when it may pass."""
        method = scope["method"]
        origin = headers.get(b"origin")
        if origin is None:
            site = headers.get(b"sec-fetch-site", b"").decode("latin-1").strip().lower()
            if site in ("cross-site", "same-site"):
                return (f"cross-origin request refused: the browser marks this {method} request "
                        f"'Sec-Fetch-Site: {site}', so a page of another origin sent it")
            return None
        given = origin.decode("latin-1")
        normal = normalize_origin(given)
        own = normalize_origin(f"{scope.get('scheme', 'http')}://{headers.get(b'host', b'').decode('latin-1')}")
        if normal is not None and (normal == own or normal in self.allowed):
            return None
        reason = f"cross-origin request refused: a page at {given} may not send {method} requests to this server"
        if normal is None:  # "null": a sandboxed frame or a file:// page, which no option names
            return reason
        return (f"{reason} (its own pages are at {own or 'an unknown origin'}); if that page is yours, e.g. a reverse "
                f"proxy's address, start the server with --allowed-origin {normal}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS or "*" in self.allowed:
            return await self.app(scope, receive, send)
        reason = self._refusal(scope, dict(scope["headers"]))
        if reason is not None:
            return await json_error(send, 403, "origin", reason)
        await self.app(scope, receive, send)
