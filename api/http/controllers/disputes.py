"""Merchants: their disputes (chargebacks), evidence and acceptance; the evidence pack."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import anyio
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter

from api.http import schemas
from api.http.auth import Principal, merchant_scope, require
from api.http.commands import run_command
from api.http.controllers.payments import scope_of
from api.http.openapi import PROCESSOR_PROBLEMS, command, problems
from api.http.problems import ApiProblem
from api.http.services import ApiServices
from domain.dispute import REASONS, Dispute, DisputeStatus

STATUSES = (DisputeStatus.NEEDS_RESPONSE, DisputeStatus.UNDER_REVIEW, DisputeStatus.WON, DisputeStatus.LOST,
            DisputeStatus.ACCEPTED, DisputeStatus.EXPIRED)
READERS = ("merchant", "admin", "compliance")


def dispute_from_row(row: dict[str, Any]) -> schemas.Dispute:
    return schemas.Dispute(
        id=str(row["dispute_id"]), merchant_id=str(row["merchant_id"]), payment_id=str(row["payment_id"]),
        processor=row["processor"], status=row["status"], reason=row["reason"], amount=int(row["amount_minor"]),
        currency=row["currency"], fee=int(row["fee_minor"]), due_by=row["due_by"],
        evidence_submitted_at=row["evidence_submitted_at"], opened_at=row["opened_at"], closed_at=row["closed_at"],
        updated_at=row["updated_at"],
    )


# What a command's answer shows of each evidence field: the answer is kept with its idempotency key
# for a day (api/http/commands.py), where erasing the customer could not reach the text.
EVIDENCE_IN_ANSWERS = "withheld"


def dispute_from_aggregate(dispute: Dispute, evidence: dict[str, str] | None = None) -> schemas.Dispute:
    """``evidence``: opened (ledger.dispute_evidence) for a read; None in a command's answer,
    which names the fields only (``EVIDENCE_IN_ANSWERS``)."""
    return schemas.Dispute(
        id=str(dispute.id), merchant_id=str(dispute.merchant_id), payment_id=str(dispute.payment_id),
        processor=dispute.processor, status=dispute.status, reason=dispute.reason, amount=dispute.amount_minor,
        currency=dispute.currency, fee=dispute.fee_minor, due_by=dispute.due_by,
        evidence_submitted_at=dispute.evidence_submitted_at, opened_at=dispute.created_on,
        closed_at=dispute.modified_on if dispute.status not in (DisputeStatus.NEEDS_RESPONSE,
                                                                DisputeStatus.UNDER_REVIEW) else None,
        updated_at=dispute.modified_on,
        evidence=evidence if evidence is not None else dict.fromkeys(dispute.evidence_fields, EVIDENCE_IN_ANSWERS),
    )


class DisputeController(Controller):
    path = "/v1/disputes"
    tags = ["merchants"]  # noqa: RUF012  (Litestar's layer attribute)

    @get("/", operation_id="listDisputes", summary="Disputes, newest first, with cursor pagination",
         responses=problems())
    async def list_disputes(
        self, services: ApiServices, principal: Principal,
        status: Annotated[str | None, Parameter(description=", ".join(STATUSES))] = None,
        reason: Annotated[str | None, Parameter(description=", ".join(REASONS))] = None,
        opened_from: datetime | None = None,
        opened_to: datetime | None = None,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        starting_after: Annotated[UUID | None, Parameter(description="the last id of the previous page")] = None,
    ) -> schemas.DisputeList:
        require(principal, *READERS)
        for name, value, known in (("status", status, STATUSES), ("reason", reason, REASONS)):
            if value is not None and value not in known:
                raise ApiProblem(400, "validation_error", f"{name} must be one of {', '.join(known)}",
                                 errors=[{"field": name, "message": f"unknown {name}"}])
        if opened_from and opened_to and opened_from > opened_to:
            raise ApiProblem(400, "validation_error", "opened_from is after opened_to",
                             errors=[{"field": "opened_from", "message": "after opened_to"}])
        try:
            rows, has_more = await anyio.to_thread.run_sync(lambda: services.views.disputes(
                scope_of(principal), status=status, reason=reason, opened_from=opened_from, opened_to=opened_to,
                limit=limit, starting_after=starting_after))
        except ValueError as error:  # an unknown (or another merchant's) cursor
            raise ApiProblem(400, "validation_error", str(error),
                             errors=[{"field": "starting_after", "message": "not a dispute you can see"}]) from None
        data = [dispute_from_row(r) for r in rows]
        return schemas.DisputeList(data=data, has_more=has_more,
                                   next_starting_after=data[-1].id if has_more and data else None)

    @get("/{dispute_id:uuid}", operation_id="getDispute", summary="A dispute, with the evidence staged or sent",
         responses=problems())
    async def read(self, dispute_id: UUID, services: ApiServices, principal: Principal) -> schemas.Dispute:
        require(principal, *READERS)
        row = await anyio.to_thread.run_sync(lambda: services.views.dispute(scope_of(principal), dispute_id))
        if row is None:
            raise ApiProblem(404, "not_found", f"no dispute {dispute_id}")
        dispute = await anyio.to_thread.run_sync(services.ledger.get_dispute, dispute_id)
        # The evidence is sealed under the customer's key: opened for the reader ("erased" after).
        evidence = await anyio.to_thread.run_sync(services.ledger.dispute_evidence, dispute)
        return dispute_from_aggregate(dispute, evidence)

    @get("/{dispute_id:uuid}/evidence-pack", operation_id="getDisputeEvidencePack",
         summary="The payment's timeline from the audit stream, with prior undisputed payments: JSON, or"
                 " ?format=pdf", responses=problems())
    async def evidence_pack(
        self, dispute_id: UUID, services: ApiServices, principal: Principal,
        format: Annotated[str, Parameter(pattern="^(json|pdf)$", description="json (default) or pdf")] = "json",
    ) -> Response[Any]:
        require(principal, "merchant", "admin")
        pack = await anyio.to_thread.run_sync(lambda: services.views.evidence_pack(scope_of(principal), dispute_id))
        if pack is None:
            raise ApiProblem(404, "not_found", f"no dispute {dispute_id}")
        if format == "pdf":
            from projections.evidence_pdf import render_pdf

            document = await anyio.to_thread.run_sync(render_pdf, pack)
            return Response(document, media_type="application/pdf", headers={
                "Content-Disposition": f'attachment; filename="evidence-{dispute_id}.pdf"'})
        return Response(pack, media_type="application/json")

    @post("/{dispute_id:uuid}/evidence", operation_id="submitDisputeEvidence", status_code=200,
          summary="Stage evidence (submit: false) or send it all to the processor (submit: true)",
          responses={**command(200, schemas.Dispute, "the dispute"), **PROCESSOR_PROBLEMS})
    async def evidence(self, request: Request[Any, Any, Any], dispute_id: UUID, data: schemas.DisputeEvidence,
                       services: ApiServices, principal: Principal) -> Response[bytes]:
        merchant_id = merchant_scope(principal)
        evidence = {k: v for k, v in {
            "product_description": data.product_description, "customer_communication": data.customer_communication,
            "service_date": data.service_date, "shipping_carrier": data.shipping_carrier,
            "shipping_tracking_number": data.shipping_tracking_number, "shipping_date": data.shipping_date,
            "refund_policy": data.refund_policy, "uncategorized_text": data.uncategorized_text,
        }.items() if v is not None}

        def run(command_id: str) -> tuple[int, Any]:
            services.ledger.submit_dispute_evidence(command_id, dispute_id, evidence, submit=data.submit,
                                                    merchant_id=merchant_id)
            return 200, dispute_from_aggregate(services.ledger.get_dispute(dispute_id))

        return await run_command(request, services, principal, data, run)

    @post("/{dispute_id:uuid}/accept", operation_id="acceptDispute", status_code=200,
          summary="Concede the dispute: the amount goes back to the cardholder",
          responses=command(200, schemas.Dispute, "the accepted dispute"))
    async def accept(self, request: Request[Any, Any, Any], dispute_id: UUID, services: ApiServices,
                     principal: Principal) -> Response[bytes]:
        merchant_id = merchant_scope(principal)

        def run(command_id: str) -> tuple[int, Any]:
            services.ledger.accept_dispute(command_id, dispute_id, merchant_id=merchant_id)
            return 200, dispute_from_aggregate(services.ledger.get_dispute(dispute_id))

        return await run_command(request, services, principal, None, run)
