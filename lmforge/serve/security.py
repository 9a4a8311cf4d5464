"""What the server lets in: request checks in front of every route, and connection timeouts.

`Guard` (ASGI middleware) answers before any route runs, in this order:

1. `Host` must name this server: a loopback name, the address it is bound to, a name given with
   `--allowed-hosts`, or (bound to every interface) any IP address. A web page on a name its owner's DNS
   points at 127.0.0.1 (DNS rebinding) sends that name, and gets 400.
2. A browser's `Origin` must be this server's own (the page at `/`) or an allowed host: a page on any
   other site gets 403, so it cannot drive the API through the user's browser.
3. With an API key, every `/v1/` route needs `Authorization: Bearer KEY` (401 otherwise). The chat page
   and `/health` stay open; the page asks for the key.
4. POSTs to `/v1/` must say `Content-Type: application/json` (415 otherwise): a cross-site form or
   `text/plain` fetch cannot send that without a CORS preflight, which this server never grants.
5. The body is read here, at most `max_body_bytes` (413 past it, before reading more than that), so a
   route never sees more.

`timed_h11_protocol` adds what uvicorn lacks: a connection must send a request's headers within
`read_timeout` seconds of connecting (or of its first byte after a response), and the body within
`read_timeout` seconds of its headers, or it is closed (uvicorn's `timeout_keep_alive` closes idle
connections between requests). Half-sent requests (slowloris) therefore hold a connection for at most
`read_timeout` seconds.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from lmforge.serve.protocol import ApiError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
DEFAULT_PORTS = {"http": 80, "https": 443}
HOST_CHARS = re.compile(r"[a-z0-9._:%-]+")  # a DNS name or an IP address (v6 without brackets, zone id)


def split_host(value: str, scheme: str = "http") -> tuple[str, int | None] | None:
    """`host[:port]` (or `[v6]:port`) -> (lower-case host without brackets, port or None); None if malformed."""
    try:
        parts = urlsplit(f"{scheme}://{value}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or not HOST_CHARS.fullmatch(host) or parts.path or parts.query or parts.fragment \
            or parts.username is not None:
        return None
    return host, port


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Policy:
    """Who may call the server: `bound_host` is the address it listens on; `allowed_hosts` may hold "*"
    (any Host header)."""

    api_key: str = ""
    bound_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def host_allowed(self, host: str) -> bool:
        named = {h.lower().strip("[]") for h in (*LOOPBACK_NAMES, self.bound_host, *self.allowed_hosts)}
        if "*" in named or host in named:
            return True
        return self.bound_host in WILDCARD_HOSTS and is_ip(host)  # every interface: reach it by any address

    def check(self, method: str, path: str, headers: dict[str, str], scheme: str = "http") -> ApiError | None:
        """The first rule (module docstring) this request breaks, or None."""
        host = headers.get("host")
        if host is not None:  # HTTP/1.0 clients may leave it out; every browser sends it
            parsed = split_host(host, scheme)
            if parsed is None or not self.host_allowed(parsed[0]):
                return ApiError(400, f"the Host header {host!r} is not a name of this server; start it with "
                                     f"--allowed-hosts {parsed[0] if parsed else 'NAME'} to accept it",
                                code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return ApiError(403, f"cross-origin request from {origin} refused: only this server's own page "
                                 f"may call it from a browser", code="cross_origin")
        if not path.startswith("/v1/"):
            return None
        if self.api_key and not self.key_matches(headers.get("authorization", "")):
            return ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
                            code="invalid_api_key")
        if method == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return ApiError(415, f"the request body must be JSON with 'Content-Type: application/json', "
                                     f"got {media or 'no Content-Type'}", code="unsupported_media_type")
        return None

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        parts = urlsplit(origin)
        try:
            target = parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        if parts.scheme not in DEFAULT_PORTS or not target[0]:
            return False  # includes "null" (sandboxed frames, file:// pages)
        if target[0] in {h.lower().strip("[]") for h in self.allowed_hosts}:
            return True
        own = split_host(host, parts.scheme) if host else None
        return own is not None and (own[0], own[1] or DEFAULT_PORTS[parts.scheme]) == target

    def key_matches(self, authorization: str) -> bool:
        scheme, _, key = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())


class Guard:
    """ASGI middleware applying a `Policy`; it reads POST bodies itself (capped) and replays them."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], policy: Policy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        error = self.policy.check(scope["method"], scope["path"], headers, scope.get("scheme", "http"))
        if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                body = await read_body(receive, headers.get("content-length"), self.policy.max_body_bytes)
            except ApiError as e:
                error = e
            else:
                if body is None:  # the client went away while sending
                    return
                receive = replay(body, receive)
        if error is not None:
            return await send_error(send, error)
        await self.app(scope, receive, send)


async def read_body(receive: Receive, content_length: str | None, limit: int) -> bytes | None:
    """The whole request body, or None if the client disconnected; 413 as soon as it passes `limit`."""
    too_large = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes "
                              f"(lmforge serve --max-body-bytes)", code="request_too_large")
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise too_large  # refused before reading it (uvicorn discards what the client still sends)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app `body` once, then the connection's own events (a disconnect)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


async def send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def timed_h11_protocol(read_timeout: float) -> type:
    """uvicorn's h11 protocol class, closing connections that take over `read_timeout` seconds to send
    a request's headers, or its body (see the module docstring). uvicorn is imported here: it is optional."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer: Any = None
        _body_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(read_timeout, self._expire, "headers")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._update_timers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update_timers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer = _cancel(self._header_timer)
            self._body_timer = _cancel(self._body_timer)
            super().connection_lost(exc)

        def _update_timers(self) -> None:
            """Headers timer: while the next request has begun (bytes buffered) but its headers are not
            complete. Body timer: while the client is sending a body."""
            state = self.conn.their_state
            if state is h11.IDLE:
                if self._header_timer is None and self.conn.trailing_data[0]:
                    self._header_timer = self.loop.call_later(read_timeout, self._expire, "headers")
            else:
                self._header_timer = _cancel(self._header_timer)
            if state is h11.SEND_BODY:
                if self._body_timer is None:
                    self._body_timer = self.loop.call_later(read_timeout, self._expire, "body")
            else:
                self._body_timer = _cancel(self._body_timer)

        def _expire(self, part: str) -> None:
            if not self.transport.is_closing():
                log.debug("closing a connection from %s: no complete request %s within %s s", self.client, part,
                          read_timeout)
                self.transport.close()

    return TimedH11Protocol


def _cancel(timer: Any) -> None:
    if timer is not None:
        timer.cancel()
