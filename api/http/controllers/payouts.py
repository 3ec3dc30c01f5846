"""Merchants: payouts to their bank account, with the payments each paid; a manual payout."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

import anyio
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter

from api.http import schemas
from api.http.auth import Principal, merchant_scope, require
from api.http.commands import run_command
from api.http.controllers.payments import scope_of
from api.http.openapi import command, problems
from api.http.problems import ApiProblem
from api.http.services import ApiServices
from domain.payout import PayoutStatus

PAYOUT_STATUSES = (PayoutStatus.CREATED, PayoutStatus.PAID, PayoutStatus.FAILED, PayoutStatus.CARRIED_FORWARD)
READERS = ("merchant", "admin", "compliance")
LINE_COLUMNS = ("payment_id", "gross_minor", "fee_minor", "shares_minor", "refunds_minor", "disputes_minor",
                "net_minor")


def payout_from_row(row: dict[str, Any], lines: list[dict[str, Any]] | None = None) -> schemas.Payout:
    return schemas.Payout(
        id=str(row["payout_id"]), merchant_id=str(row["merchant_id"]), currency=row["currency"],
        cutoff=str(row["cutoff"]), status=row["status"], amount=int(row["amount_minor"]),
        carried_in=int(row["carried_in_minor"]), reserve_held=int(row["reserve_held_minor"]),
        reserve_released=int(row["reserve_released_minor"]), line_count=int(row["line_count"]),
        bank_reference=row["bank_reference"], failure_reason=row["failure_reason"], created_at=row["created_at"],
        updated_at=row["updated_at"],
        lines=None if lines is None else [
            schemas.PayoutLine(payment_id=str(line["payment_id"]), gross=int(line["gross_minor"]),
                               fee=int(line["fee_minor"]), shares=int(line["shares_minor"]),
                               refunds=int(line["refunds_minor"]), disputes=int(line["disputes_minor"]),
                               net=int(line["net_minor"]))
            for line in lines
        ],
    )


class PayoutController(Controller):
    path = "/v1/payouts"
    tags = ["merchants"]  # noqa: RUF012  (Litestar's layer attribute)

    @get("/", operation_id="listPayouts", summary="Payouts, newest first, with cursor pagination",
         responses=problems())
    async def list_payouts(
        self, services: ApiServices, principal: Principal,
        status: Annotated[str | None, Parameter(description=", ".join(PAYOUT_STATUSES))] = None,
        currency: Annotated[str | None, Parameter(min_length=3, max_length=3)] = None,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        starting_after: Annotated[UUID | None, Parameter(description="the last id of the previous page")] = None,
    ) -> schemas.PayoutList:
        require(principal, *READERS)
        if status is not None and status not in PAYOUT_STATUSES:
            raise ApiProblem(400, "validation_error", f"status must be one of {', '.join(PAYOUT_STATUSES)}",
                             errors=[{"field": "status", "message": "unknown status"}])
        try:
            rows, has_more = await anyio.to_thread.run_sync(lambda: services.views.payouts(
                scope_of(principal), status=status, currency=currency, limit=limit, starting_after=starting_after))
        except ValueError as error:  # an unknown (or another merchant's) cursor
            raise ApiProblem(400, "validation_error", str(error),
                             errors=[{"field": "starting_after", "message": "not a payout you can see"}]) from None
        data = [payout_from_row(r) for r in rows]
        return schemas.PayoutList(data=data, has_more=has_more,
                                  next_starting_after=data[-1].id if has_more and data else None)

    @get("/{payout_id:uuid}", operation_id="getPayout", summary="A payout with its lines (the payments it paid)",
         responses=problems())
    async def read(self, payout_id: UUID, services: ApiServices, principal: Principal) -> schemas.Payout:
        require(principal, *READERS)
        found = await anyio.to_thread.run_sync(lambda: services.views.payout(scope_of(principal), payout_id))
        if found is None:
            raise ApiProblem(404, "not_found", f"no payout {payout_id}")
        row, lines = found
        return payout_from_row(row, lines)

    @get("/{payout_id:uuid}/lines.csv", operation_id="getPayoutLinesCsv", media_type="text/csv",
         summary="A payout's lines as CSV, for the merchant's bookkeeping", responses=problems())
    async def lines_csv(self, payout_id: UUID, services: ApiServices, principal: Principal) -> Response[str]:
        require(principal, *READERS)
        found = await anyio.to_thread.run_sync(lambda: services.views.payout(scope_of(principal), payout_id))
        if found is None:
            raise ApiProblem(404, "not_found", f"no payout {payout_id}")
        row, lines = found
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["payout_id", "currency", *LINE_COLUMNS])
        for line in lines:
            writer.writerow([row["payout_id"], row["currency"], *(line[c] for c in LINE_COLUMNS)])
        return Response(out.getvalue(), media_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="payout-{payout_id}-lines.csv"'})

    @post("/", operation_id="createPayout", status_code=201,
          summary="Pay out now what is available in one currency (merchants on any schedule; one payout a day)",
          responses=command(201, schemas.Payout, "the payout (today's, if one was made already)"))
    async def create(self, request: Request[Any, Any, Any], data: schemas.PayoutCreate, services: ApiServices,
                     principal: Principal) -> Response[bytes]:
        merchant_id = merchant_scope(principal)

        def run(command_id: str) -> tuple[int, Any]:
            today = datetime.now(UTC).date()
            result = services.ledger.create_payout(merchant_id, data.currency, today)
            payout = services.ledger.get_payout(UUID(result.result["payout_id"]))
            created = datetime.fromisoformat(payout.created_on.isoformat())
            return 201, schemas.Payout(
                id=str(payout.id), merchant_id=str(payout.merchant_id), currency=payout.currency, cutoff=payout.cutoff,
                status=payout.status, amount=payout.amount_minor, carried_in=payout.carried_in_minor,
                reserve_held=payout.reserve_held_minor, reserve_released=payout.reserve_released_minor,
                line_count=len(payout.lines), bank_reference=payout.bank_reference,
                failure_reason=payout.failure_reason, created_at=created,
                updated_at=datetime.fromisoformat(payout.modified_on.isoformat()),
                lines=[schemas.PayoutLine(payment_id=line["payment_id"], gross=line["gross_minor"],
                                          fee=line["fee_minor"], shares=line.get("shares_minor", 0),
                                          refunds=line["refunds_minor"], disputes=line.get("disputes_minor", 0),
                                          net=line["net_minor"])
                       for line in payout.lines],
            )

        return await run_command(request, services, principal, data, run)
