"""Request ids and one structured log line per request, with no personal data or secrets: the
path (ids only), the method, the status, the time, the caller's key id and role."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from api.http.redaction import redact_path

log = structlog.get_logger("echotransact.http")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode(errors="replace") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status: dict[str, int] = {}
        logged = False

        def log_request() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            principal: Any = scope.get("state", {}).get("principal")
            log.info(
                "request",
                method=scope.get("method"),
                path=redact_path(scope.get("path") or ""),  # a payment link's token is a secret
                status=status.get("code"),
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                key_id=str(principal.key_id) if principal else None,
                role=principal.role if principal else None,
            )

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Logged before the last byte leaves: a caller who has the response can already
                # find its line (a line written after the send races the caller's next step).
                log_request()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log_request()
            structlog.contextvars.clear_contextvars()
