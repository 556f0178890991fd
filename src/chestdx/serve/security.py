"""What every request passes before a route sees it: body limits, a body timeout, safe headers.

A pure ASGI middleware, so an oversized body is refused from its Content-Length before a byte
of it is read, and a body that stops arriving (a slow client holding a worker) ends in 408.
The page's Content-Security-Policy allows only the service's own scripts and styles; `/docs`
(behind a login) also loads the Swagger UI from its CDN.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

log = logging.getLogger("chestdx.serve")

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
            "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"no-referrer"), (b"cross-origin-opener-policy", b"same-origin"),
           (b"permissions-policy", b"camera=(), microphone=(), geolocation=()")]


def error_body(status: int, message: str, file: str | None = None) -> bytes:
    """The one error schema of the service: {"error": {"status", "message", "file"}}."""
    return json.dumps({"error": {"status": status, "message": message, "file": file}}).encode()


class RequestGuard:
    """Body size limit, body timeout and security headers for every HTTP request."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, require_credentials: bool = False,
                 min_rate_bytes_s: float = 50_000):
        self.app, self.max_body, self.timeout = app, max_body_bytes, body_timeout_s
        self.require_credentials = require_credentials
        self.min_rate = min_rate_bytes_s  # a body slower than this (after the first timeout) is cut off

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        secure = scope.get("scheme") == "https"
        extra = [(b"content-security-policy", (DOCS_CSP if path == "/docs" else PAGE_CSP).encode())]
        if secure:
            extra.append((b"strict-transport-security", b"max-age=31536000"))
        if path.startswith("/api/"):
            extra.append((b"cache-control", b"no-store"))

        async def send_error(status: int, message: str):
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    *HEADERS, *extra]})
            await send({"type": "http.response.body", "body": error_body(status, message)})

        headers = dict(scope.get("headers") or [])
        method = scope.get("method", "GET")
        # A post without any credential is refused before its body is read: anonymous clients cannot
        # make the service spool uploads (the route checks the credential itself).
        if (self.require_credentials and method not in ("GET", "HEAD", "OPTIONS") and path != "/api/v1/login"
                and not (headers.get(b"x-api-key") or headers.get(b"authorization")
                         or b"chestdx_session=" in headers.get(b"cookie", b""))):
            return await send_error(401, "authentication required: an API key (X-API-Key header or "
                                         "Authorization: Bearer) or a login session")
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await send_error(400, "the Content-Length header is not a number")
            length = int(declared)
            if length > self.max_body:
                return await send_error(413, f"the request body ({length / 2**20:.0f} MB) is larger than the "
                                             f"{self.max_body / 2**20:.0f} MB limit")
        failure: dict = {}
        received = 0
        started_at = time.monotonic()

        async def guarded_receive():
            nonlocal received
            # One deadline for the whole body, growing with what has arrived at the minimum rate: a
            # client trickling a byte at a time cannot hold a connection for ever.
            deadline = started_at + self.timeout + received / self.min_rate
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                failure["error"] = (408, f"the request body did not arrive in time ({self.timeout:g} s, then at "
                                         f"least {self.min_rate / 1000:g} kB/s)")
                raise _BodyRefused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # chunked uploads declare no length
                    failure["error"] = (413, f"the request body is larger than the "
                                             f"{self.max_body / 2**20:.0f} MB limit")
                    raise _BodyRefused
            return message

        started = False

        async def guarded_send(message):
            nonlocal started
            if "error" in failure:  # the route's own answer to a broken body is replaced by ours
                if not started:
                    started = True
                    await send_error(*failure["error"])
                return
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *HEADERS, *extra]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _BodyRefused:
            if not started:
                started = True
                await send_error(*failure["error"])
        except Exception:  # a bug: answered here, inside, so the 500 carries the same headers
            log.exception("unexpected error")
            if not started:
                started = True
                await send_error(500, "internal error; the request was not processed")


class _BodyRefused(Exception):
    pass
