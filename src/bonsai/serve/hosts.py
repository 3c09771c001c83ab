"""The Host header check that keeps a loopback server out of reach of DNS rebinding.

A page at http://evil.example:7860 whose name its owner then points at 127.0.0.1 reaches this server
as a page of its own origin: the browser sends Origin and Host evil.example:7860, lets the page read
the answers (history, images, prompts) and lets it POST. Only the Host header gives it away, so a
server bound to loopback answers only requests addressed to an IP address, to localhost, or to a
name that the user allowed (--allowed-host).

IP addresses always pass: the attack needs a DNS name to re-point, and a browser that was given an
address connected to that address. Names under .localhost do not pass by default: most browsers
resolve them to loopback themselves, but not every browser or system resolver does, and a name that
reaches the network's DNS can be answered by whoever controls it, as evil.example can.
"""

from __future__ import annotations

import ipaddress
import re

from .middleware import ASGIApp, Receive, Scope, Send, json_error

_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")  # "name." (absolute) is allowed only as written
_PORT = re.compile(r"[0-9]*")
_BRACKETED = re.compile(r"\[([^\]]*)\](:[0-9]*)?")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether the bind address or name `host` (IPv6 with or without brackets) is this machine's loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def is_unspecified(host: str) -> bool:
    """Whether the bind address `host` is the any-address (0.0.0.0, ::): every address of this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def browsable(host: str) -> str:
    """What to put in a URL for a server bound to `host`: IPv6 in brackets, and for the any-address the
    loopback address of its family (browsers may refuse http://0.0.0.0/)."""
    if is_unspecified(host):
        return "127.0.0.1" if ipaddress.ip_address(host.strip("[]")).version == 4 else "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def parse_host_header(value: str) -> str | None:
    """The host of a Host header value (lower case, IPv6 without brackets, port dropped), or None when the
    value is not host[:port]."""
    value = value.strip().lower()
    bracketed = _BRACKETED.fullmatch(value)
    if bracketed:
        return bracketed[1] if ":" in bracketed[1] and _is_ip(bracketed[1]) else None
    host, _, port = value.partition(":")
    return host if _NAME.fullmatch(host) and _PORT.fullmatch(port) else None


def host_pattern(value: str) -> str:
    """`value` of --allowed-host as compared: a lower-case name, '*.suffix' (names under suffix), '*' (any)
    or an IP address; ValueError saying what to write instead."""
    text = value.strip().lower()
    if text == "*":
        return text
    if "://" in text or "/" in text:
        raise ValueError(f"{value!r} is not a host name: give the name alone, e.g. bonsai.example.org, without scheme or path")
    if _is_ip(text.strip("[]")):
        return str(ipaddress.ip_address(text.strip("[]")))
    if ":" in text:
        raise ValueError(f"{value!r} has a port: give the name alone (any port is accepted)")
    name = text[2:] if text.startswith("*.") else text
    if not _NAME.fullmatch(name):
        raise ValueError(f"{value!r} is not a host name: write e.g. bonsai.example.org, '*.example.org' for the names "
                         "under it, or '*' for any")
    return text


class HostPolicy:
    """Which Host names a server accepts: IP addresses, localhost, and `patterns` (already host_pattern's)."""

    def __init__(self, patterns: frozenset[str]):
        self.names = frozenset(p for p in patterns if not p.startswith("*."))
        self.suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))

    def accepts(self, host: str) -> bool:
        return host == "localhost" or _is_ip(host) or host in self.names or host.endswith(self.suffixes)


def host_policy(bind: str, allowed: tuple[str, ...]) -> HostPolicy | None:
    """The check for a server bound to `bind` with these --allowed-host values; None: any Host passes
    ('*' allowed, or bound to a non-loopback address with none given: LAN clients use names it cannot know).
    ValueError naming the first value that is not a host name."""
    patterns = frozenset(host_pattern(value) for value in allowed)
    if "*" in patterns or (not patterns and not is_loopback(bind)):
        return None
    return HostPolicy(patterns)


class HostCheck:
    """Refuses (400) a request whose Host header names a host that `policy` does not accept.

    A request without a Host header (or with an empty one, as HTTP/1.0 clients may send) passes:
    browsers always send the host they connected to, and a page can neither drop nor change it."""

    def __init__(self, app: ASGIApp, policy: HostPolicy):
        self.app = app
        self.policy = policy

    def _refusal(self, value: str) -> str | None:
        host = parse_host_header(value)
        if host is None:
            return f"Host header {value!r} is not host[:port]"
        if self.policy.accepts(host):
            return None
        return (f"this server does not answer to the name {host!r}: it answers to localhost, IP addresses and the names "
                f"given with --allowed-host, so that a web page cannot reach it by pointing its own domain at this "
                f"machine (DNS rebinding); if {host} is yours, start the server with --allowed-host {host}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the app has no websocket routes
            return await self.app(scope, receive, send)
        value = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        reason = self._refusal(value) if value.strip() else None
        if reason is not None:
            return await json_error(send, 400, "host", reason)
        await self.app(scope, receive, send)
