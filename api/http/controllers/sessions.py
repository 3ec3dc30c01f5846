"""Voice integrators: open a payment session, read its status, cancel it."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import anyio
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter

from api.http import schemas
from api.http.auth import Principal, merchant_scope, require
from api.http.commands import run_command
from api.http.controllers._common import session_from_aggregate, session_from_row
from api.http.openapi import command, problems
from api.http.problems import ApiProblem
from api.http.services import ApiServices
from application.errors import NotFound
from domain.ledger import Split
from domain.payment_session import PaymentSession
from domain.values import mask_phone
from projections.views import Scope


class PaymentSessionController(Controller):
    path = "/v1/payment-sessions"
    tags = ["voice integrators"]  # noqa: RUF012  (Litestar's layer attribute)

    @post("/", operation_id="createPaymentSession", status_code=201,
          summary="Open a payment session for an order taken in conversation",
          responses=command(201, schemas.PaymentSession, "the session, with the link texted to the customer"))
    async def create(self, request: Request[Any, Any, Any], data: schemas.PaymentSessionCreate,
                     services: ApiServices, principal: Principal) -> Response[bytes]:
        merchant_id = merchant_scope(principal)
        refusal = schemas.phone_refusal(data.customer_phone)
        if refusal is not None:
            # The domain's code for a bad phone, so callers keep one code to handle; refused
            # before the Idempotency-Key is claimed, like any other malformed body.
            raise ApiProblem(422, "invalid_phone", f"customer_phone {refusal}",
                             errors=[{"field": "customer_phone", "message": refusal}])

        def run(command_id: str) -> tuple[int, Any]:
            # Opening a session texts the customer the link and code (through the outbox), in
            # the same save as the opening.
            ledger = services.ledger
            issued = ledger.open_session_and_send_link(
                command_id, merchant_id=merchant_id, amount_minor=data.amount, currency=data.currency,
                customer_phone=data.customer_phone, order_reference=data.order.reference,
                line_items=[{"sku": i.sku, "name": i.name, "quantity": i.quantity,
                             "unit_amount_minor": i.unit_amount} for i in data.order.items],
                voice_platform=data.voice.platform, conversation_id=data.voice.conversation_id,
                callback_url=data.callback_url, metadata=data.metadata,
                splits=[Split(s.party, s.amount, s.percent_bps) for s in data.splits or ()],
            )
            result = issued.result
            session_id = UUID(result.result["session_id"])
            session = result.saved_one(PaymentSession, session_id) or ledger.get_session(session_id)
            # The phone is the request's: no need to open the sealed copy with the customer's key.
            return 201, session_from_aggregate(session, result.position, phone_masked=mask_phone(data.customer_phone))

        return await run_command(request, services, principal, data, run)

    @get("/{session_id:uuid}", operation_id="getPaymentSession", summary="A payment session's status",
         responses=problems())
    async def read(
        self, session_id: UUID, services: ApiServices, principal: Principal,
        wait_for_position: Annotated[int | None, Parameter(
            ge=1, description="wait (up to 5 s) until the read model has applied this position, "
                              "as returned by a command")] = None,
    ) -> schemas.PaymentSession:
        require(principal, "merchant", "admin")
        scope = Scope(principal.role, principal.merchant_id)
        cached = await services.status.cached("session", session_id, scope=scope,
                                              wait_for_position=wait_for_position)
        if cached is not None:  # the usual case: answered without leaving the event loop
            return session_from_row(cached)
        row, reached = await anyio.to_thread.run_sync(
            lambda: services.status.get("session", session_id, wait_for_position=wait_for_position, scope=scope))
        if row is not None and reached:
            return session_from_row(row)
        # The read model is behind: not there yet (the caller's own session, just created), or not
        # at the caller's position. Answer from the write model, which has every acknowledged
        # session: its creator sees it at once, with ``projection_caught_up: false``.
        try:
            session = await anyio.to_thread.run_sync(
                lambda: services.ledger.get_session(session_id, principal.merchant_id))
        except NotFound:
            raise ApiProblem(404, "not_found", f"no payment session {session_id}") from None
        phone_masked = await anyio.to_thread.run_sync(lambda: services.ledger.session_phone_masked(session))
        return session_from_aggregate(session, None, phone_masked=phone_masked, caught_up=False)

    @post("/{session_id:uuid}/cancel", operation_id="cancelPaymentSession", status_code=200,
          summary="Cancel a session that has not been paid",
          responses=command(200, schemas.PaymentSession, "the cancelled session"))
    async def cancel(self, request: Request[Any, Any, Any], session_id: UUID,
                     services: ApiServices, principal: Principal,
                     data: schemas.PaymentSessionCancel | None = None) -> Response[bytes]:
        merchant_id = merchant_scope(principal)
        body = data or schemas.PaymentSessionCancel()

        def run(command_id: str) -> tuple[int, Any]:
            ledger = services.ledger
            result = ledger.cancel_session(command_id, session_id, reason=body.reason, merchant_id=merchant_id)
            # The session as the command saved it; loaded again only for a replayed command.
            session = result.saved_one(PaymentSession, session_id) or ledger.get_session(session_id)
            return 200, session_from_aggregate(session, result.position,
                                               phone_masked=ledger.session_phone_masked(session))

        return await run_command(request, services, principal, body, run)
