"""Processors: their signed notifications (disputes, early fraud warnings), applied to the ledger.

No API key: a processor proves who it is by signing the raw body with a secret we share
(adapters/processors/notifications.py; ``ECHOTRANSACT_PROCESSOR_WEBHOOK_SECRETS``), so the app's
key check lets ``PROCESSOR_EVENTS_PREFIX`` through. The signature is checked on the bytes as
received, before the body is parsed: a caller without a valid signature learns nothing of the
body, nor whether the processor it named exists. The ledger applies each event once, by the
processor's event id; a delivery again answers ``replayed: true``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from litestar import Controller, Request, post
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema, SecurityScheme
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType
from msgspec import Struct

from adapters.processors.notifications import (
    SIGNATURE_HEADER,
    TOLERANCE_S,
    InvalidSignature,
    MalformedNotification,
    parse_event,
    verify,
)
from api.http.openapi import problems
from api.http.problems import ApiProblem
from api.http.services import ApiServices
from application.disputes import PROCESSOR_EVENT_TYPES

log = structlog.get_logger(__name__)

PROCESSOR_EVENTS_PREFIX = "/v1/processor-events/"
SIGNATURE_SCHEME = "processorSignature"
SECURITY_SCHEMES = {SIGNATURE_SCHEME: SecurityScheme(
    type="apiKey", security_scheme_in="header", name=SIGNATURE_HEADER,
    description=f"t=<unix seconds>,v1=<hex HMAC-SHA256(the processor's secret, \"<t>.<raw body>\")>, within "
                f"{TOLERANCE_S} s of our clock; several v1 allowed")}

# A 401 names the scheme that would do (RFC 9110): a signature, not a Bearer key.
CHALLENGE = {"WWW-Authenticate": f'{SIGNATURE_HEADER} realm="processor-events"'}


class ProcessorEventReceived(Struct):
    received: bool
    replayed: bool  # true: this event id was applied before; nothing changed this time


def _string(description: str, **kwargs: Any) -> Schema:
    return Schema(type=OpenAPIType.STRING, description=description, **kwargs)


_NULLABLE_STRING = [OpenAPIType.STRING, OpenAPIType.NULL]
NOTIFICATION_SCHEMA = Schema(
    type=OpenAPIType.OBJECT, required=["id", "type", "created", "data"],
    properties={
        "id": _string("the processor's event id: the same on every retry", min_length=1, max_length=255),
        "type": _string("what happened", enum=list(PROCESSOR_EVENT_TYPES)),
        "created": _string("when the processor emitted it, ISO 8601 with a zone", format=OpenAPIFormat.DATE_TIME),
        "data": Schema(type=OpenAPIType.OBJECT, required=["payment_reference"], properties={
            "payment_reference": _string("the processor's reference of the capture", min_length=1, max_length=255),
            "dispute_id": Schema(type=_NULLABLE_STRING, description="the processor's dispute id (dispute.*)"),
            "reason": Schema(type=_NULLABLE_STRING,
                             description="fraudulent, product_not_received, duplicate, product_unacceptable, ..."),
            "amount": Schema(type=[OpenAPIType.INTEGER, OpenAPIType.NULL], minimum=1,
                             description="disputed amount in minor units (may be part of the capture)"),
            "currency": Schema(type=_NULLABLE_STRING, pattern="^[A-Z]{3}$"),
            "due_by": Schema(type=_NULLABLE_STRING, format=OpenAPIFormat.DATE_TIME,
                             description="when the merchant's evidence is due"),
        }),
    },
)


@dataclass
class _SignedJsonBody(Operation):
    """The operation as generated, plus its request body: the handler reads the raw bytes itself
    (the signature covers them exactly), so Litestar cannot infer the body's schema."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(required=True, content={
            "application/json": OpenAPIMediaType(schema=NOTIFICATION_SCHEMA)})


class ProcessorEventController(Controller):
    path = PROCESSOR_EVENTS_PREFIX.rstrip("/")
    tags = ["processors"]  # noqa: RUF012  (Litestar's layer attribute)

    @post("/{processor:str}", operation_id="receiveProcessorEvent", status_code=200,
          summary="A processor's signed notification (dispute opened, won, lost; early fraud warning)",
          security=[{SIGNATURE_SCHEME: []}], operation_class=_SignedJsonBody, responses=problems())
    async def receive(self, processor: str, request: Request[Any, Any, Any],
                      services: ApiServices) -> ProcessorEventReceived:
        body = await request.body()
        secrets = services.settings.processor_webhook_secrets.get(processor, ())
        try:
            verify(request.headers.get(SIGNATURE_HEADER), body, secrets)
        except InvalidSignature as refused:
            # Why, for us; the caller gets one answer for every reason (unknown processor included).
            log.warning("processor_event_refused", processor=processor[:64], reason=refused.reason)
            raise ApiProblem(401, "invalid_signature", f"the {SIGNATURE_HEADER} header is missing, not valid for "
                             "this processor, or not within the time allowed", headers=CHALLENGE) from None
        try:
            event = parse_event(body)
        except MalformedNotification as error:
            raise ApiProblem(400, "validation_error", f"not a notification we can read: {error}",
                             errors=[{"field": error.field, "message": error.message}]) from None
        # NotFound (no payment has the reference: the processor retries) and every rejection go
        # through the problem table (api/http/problems.py).
        result = await anyio.to_thread.run_sync(services.ledger.record_processor_event, processor, event)
        log.info("processor_event_received", processor=processor, event_id=event.event_id, type=event.type,
                 replayed=result.replayed)
        return ProcessorEventReceived(received=True, replayed=result.replayed)
