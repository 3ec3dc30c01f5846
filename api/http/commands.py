"""Running a command over HTTP exactly once per Idempotency-Key.

Same key and same request: the first response again, with ``Idempotent-Replayed: true``.
Same key, different request: 409 ``idempotency_key_reused``. Same key while the first request
is still running: 409 ``request_in_progress``. The command id given to the ledger is derived
from the key, so even a lost idempotency record cannot make a payment run twice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any
from uuid import UUID

import anyio
import msgspec
from litestar import Request, Response

from api.http.auth import Principal
from api.http.problems import PROBLEM_JSON, ApiProblem, domain_problem_body, status_for
from api.http.services import ApiServices
from domain.errors import DomainError

IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_encoder = msgspec.json.Encoder(order="sorted")

Outcome = tuple[int, Any]  # (HTTP status, a msgspec-encodable body)


def _response(status: int, body: bytes | str, *, replayed: bool) -> Response[bytes]:
    content = body.encode() if isinstance(body, str) else body
    media_type = PROBLEM_JSON if status >= 400 else "application/json"
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return Response(content, status_code=status, media_type=media_type, headers=headers)


async def run_command(
    request: Request[Any, Any, Any],
    services: ApiServices,
    principal: Principal,
    payload: msgspec.Struct | None,
    run: Callable[[str], Outcome],
) -> Response[bytes]:
    key = request.headers.get("idempotency-key")
    if key is None:
        raise ApiProblem(400, "idempotency_key_required",
                         "commands need an Idempotency-Key header (any unique string up to 255 characters)")
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiProblem(400, "invalid_idempotency_key",
                         "the Idempotency-Key must be 1-255 printable ASCII characters without spaces")
    path = request.url.path
    request_hash = hashlib.sha256(
        f"{request.method} {path}\n".encode() + _encoder.encode(payload)
    ).hexdigest()
    scope = principal.idempotency_scope
    command_id = f"{scope}:{key}"
    # Claim, run and record in one worker thread: one hand-off per command, not three.
    status, encoded, replayed = await anyio.to_thread.run_sync(
        _claim_run_record, request, services, scope, key, request_hash, command_id, run)
    return _response(status, encoded, replayed=replayed)


def _claim_run_record(
    request: Request[Any, Any, Any], services: ApiServices, scope: str, key: str, request_hash: str,
    command_id: str, run: Callable[[str], Outcome],
) -> tuple[int, bytes | str, bool]:
    store = services.idempotency
    begin = store.begin(scope, key, request_hash)
    if begin.outcome == "replay":
        assert begin.status is not None and begin.body is not None
        return begin.status, begin.body, True
    if begin.outcome == "conflict":
        raise ApiProblem(409, "idempotency_key_reused",
                         "this Idempotency-Key was already used for a different request")
    if begin.outcome == "in_progress":
        raise ApiProblem(409, "request_in_progress",
                         "a request with this Idempotency-Key is still running; retry in a moment",
                         headers={"Retry-After": "1"})
    subject: UUID | None = None
    try:
        status, body = run(command_id)
        encoded = _encoder.encode(body)
        subject = _subject_of(body)
    except DomainError as error:
        status = status_for(error)
        if status >= 500:
            store.release(scope, key, request_hash)
            raise
        # Recorded with the rest: a replay answers with this body, request id included, which
        # names the request whose log lines tell how it was decided.
        encoded = _encoder.encode(domain_problem_body(error, request))
    except BaseException:
        # Our failure, not the request's: forget the claim so that a retry runs.
        store.release(scope, key, request_hash)
        raise
    store.complete(scope, key, request_hash, status, encoded.decode(), subject_id=subject)
    return status, encoded, False


def _subject_of(body: Any) -> UUID | None:
    """The id of the resource a successful response describes (every resource body has ``id``):
    recorded with the response, so a customer's erasure finds the responses about their sessions."""
    subject = body.get("id") if isinstance(body, dict) else getattr(body, "id", None)
    if isinstance(subject, UUID):
        return subject
    try:
        return UUID(str(subject)) if subject is not None else None
    except ValueError:
        return None
