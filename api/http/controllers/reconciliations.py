"""Compliance and admin: the processors' days reconciled, and each one with its findings.

Reads go through the read views (projections/views.py) as the reader role with the caller's
scope; the rows are the platform's, so row-level security shows them to compliance and admin only.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any
from uuid import UUID

import anyio
from litestar import Controller, get
from litestar.params import Parameter
from msgspec import Struct

from api.http.auth import Principal, require
from api.http.controllers.payments import scope_of
from api.http.openapi import problems
from api.http.problems import ApiProblem
from api.http.schemas import Links
from api.http.services import ApiServices
from domain.reconciliation import FINDINGS

ROLES = ("compliance", "admin")
OUTCOMES_TEXT = ", ".join(FINDINGS)


class ReconciliationCounts(Struct):
    matched: int
    amount_mismatch: int
    missing_from_report: int
    unknown_to_us: int
    late: int


class ReconciliationDeposit(Struct):
    deposit_id: str
    amount: int  # minor units of the reconciliation's currency: the deposit's total


class ReconciliationFinding(Struct):
    # matched, amount_mismatch, missing_from_report, unknown_to_us or late; the middle three are
    # discrepancies (late: listed on a later day than our ledger recorded it, but paid).
    outcome: str
    discrepancy: bool
    processor_reference: str
    kind: str  # capture, refund or chargeback
    payment_id: str | None
    expected_amount: int | None  # ours, signed like the report (refunds negative); None: unknown to us
    reported_amount: int | None  # the processor's gross; None: missing from the report
    fee: int | None
    deposit_id: str | None


class Reconciliation(Struct):
    id: str
    processor: str
    day: date
    currency: str
    counts: ReconciliationCounts
    discrepancies: int  # amount_mismatch + missing_from_report + unknown_to_us
    deposits: list[ReconciliationDeposit]
    reconciled_at: datetime
    position: int
    links: Links
    # Only on GET /v1/reconciliations/{id}: discrepancies first, then in the report's order.
    findings: list[ReconciliationFinding] | None = None


class ReconciliationList(Struct):
    data: list[Reconciliation]
    has_more: bool
    next_starting_after: str | None


def reconciliation_from_row(row: dict[str, Any]) -> Reconciliation:
    findings = row.get("findings")
    return Reconciliation(
        id=str(row["reconciliation_id"]), processor=row["processor"], day=row["day"], currency=row["currency"],
        counts=ReconciliationCounts(**{outcome: int(row[f"{outcome}_count"]) for outcome in FINDINGS}),
        discrepancies=int(row["discrepancy_count"]),
        deposits=[ReconciliationDeposit(deposit_id=d["deposit_id"], amount=int(d["total_minor"]))
                  for d in row["deposits"]],
        reconciled_at=row["reconciled_at"], position=int(row["position"]),
        links=Links(self=f"/v1/reconciliations/{row['reconciliation_id']}"),
        findings=[
            ReconciliationFinding(
                outcome=f["outcome"], discrepancy=bool(f["discrepancy"]),
                processor_reference=f["processor_reference"], kind=f["kind"], payment_id=f["payment_id"],
                expected_amount=f["expected_minor"], reported_amount=f["reported_minor"], fee=f["fee_minor"],
                deposit_id=f["deposit_id"],
            )
            for f in findings
        ] if findings is not None else None,
    )


def _outcome(outcome: str | None) -> None:
    if outcome is not None and outcome not in FINDINGS:
        raise ApiProblem(400, "validation_error", f"outcome must be one of {OUTCOMES_TEXT}",
                         errors=[{"field": "outcome", "message": "unknown outcome"}])


class ReconciliationController(Controller):
    path = "/v1/reconciliations"
    tags = ["compliance"]  # noqa: RUF012  (Litestar's layer attribute)

    @get("/", operation_id="listReconciliations",
         summary="Processors' days reconciled, newest day first, with cursor pagination", responses=problems())
    async def list_reconciliations(
        self, services: ApiServices, principal: Principal,
        processor: Annotated[str | None, Parameter(min_length=1, max_length=50)] = None,
        currency: Annotated[str | None, Parameter(pattern="^[A-Z]{3}$")] = None,
        date_from: Annotated[date | None, Parameter(description="the first day (inclusive)")] = None,
        date_to: Annotated[date | None, Parameter(description="the last day (inclusive)")] = None,
        has_discrepancies: Annotated[bool | None, Parameter(
            description="true: only days with a discrepancy; false: only days without")] = None,
        outcome: Annotated[str | None, Parameter(
            description=f"only days with at least one finding of this outcome: {OUTCOMES_TEXT}")] = None,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        starting_after: Annotated[UUID | None, Parameter(description="the last id of the previous page")] = None,
    ) -> ReconciliationList:
        require(principal, *ROLES)
        _outcome(outcome)
        if date_from and date_to and date_from > date_to:
            raise ApiProblem(400, "validation_error", "date_from is after date_to",
                             errors=[{"field": "date_from", "message": "after date_to"}])
        try:
            rows, has_more = await anyio.to_thread.run_sync(lambda: services.views.reconciliations(
                scope_of(principal), processor=processor, currency=currency, date_from=date_from,
                date_to=date_to, has_discrepancies=has_discrepancies, outcome=outcome, limit=limit,
                starting_after=starting_after))
        except ValueError as error:  # an unknown cursor
            raise ApiProblem(400, "validation_error", str(error), errors=[
                {"field": "starting_after", "message": "not a reconciliation you can see"}]) from None
        data = [reconciliation_from_row(r) for r in rows]
        return ReconciliationList(data=data, has_more=has_more,
                                  next_starting_after=data[-1].id if has_more and data else None)

    @get("/{reconciliation_id:uuid}", operation_id="getReconciliation",
         summary="A processor's day reconciled, with every finding (discrepancies first)", responses=problems())
    async def read(
        self, reconciliation_id: UUID, services: ApiServices, principal: Principal,
        outcome: Annotated[str | None, Parameter(
            description=f"only the findings of this outcome: {OUTCOMES_TEXT}")] = None,
    ) -> Reconciliation:
        require(principal, *ROLES)
        _outcome(outcome)
        row = await anyio.to_thread.run_sync(
            lambda: services.views.reconciliation(scope_of(principal), reconciliation_id, outcome=outcome))
        if row is None:
            raise ApiProblem(404, "not_found", f"no reconciliation {reconciliation_id}")
        return reconciliation_from_row(row)
