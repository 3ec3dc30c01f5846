"""Merchants: payment history, one payment with its timeline (now, or as it was at a time),
capture, void, refunds, balances (per account, and split per merchant into pending, available,
reserved and in transit; now, or as of a time) and one account's balance history."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import anyio
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter

from api.http import schemas
from api.http.auth import Principal, merchant_scope, require
from api.http.commands import run_command
from api.http.controllers._common import payment_from_aggregate, payment_from_row
from api.http.openapi import PROCESSOR_PROBLEMS, command, problems
from api.http.problems import ApiProblem
from api.http.services import ApiServices
from application.errors import NotFound
from projections.views import MAX_HISTORY_POINTS, OutOfRange, Scope, check_moment

PAYMENT_STATUSES = ("initiated", "processing", "authorized", "captured", "settled", "voided",
                    "authorization_expired", "failed", "refunded")


AS_OF = Parameter(description="an RFC 3339 time with its offset, e.g. 2026-11-23T10:00:00Z: the answer as it was"
                              " then (not in the future)")


def scope_of(principal: Principal) -> Scope:
    return Scope(principal.role, principal.merchant_id)


def out_of_range(error: OutOfRange) -> ApiProblem:
    return ApiProblem(400, "validation_error", str(error), errors=[{"field": error.field, "message": str(error)}])


class PaymentController(Controller):
    path = "/v1/payments"
    tags = ["merchants"]  # noqa: RUF012  (Litestar's layer attribute)

    @get("/", operation_id="listPayments", summary="Payments, newest first, with cursor pagination",
         responses=problems())
    async def list_payments(
        self, services: ApiServices, principal: Principal,
        status: Annotated[str | None, Parameter(description=", ".join(PAYMENT_STATUSES))] = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        starting_after: Annotated[UUID | None, Parameter(description="the last id of the previous page")] = None,
    ) -> schemas.PaymentList:
        require(principal, "merchant", "admin")
        if status is not None and status not in PAYMENT_STATUSES:
            raise ApiProblem(400, "validation_error", f"status must be one of {', '.join(PAYMENT_STATUSES)}",
                             errors=[{"field": "status", "message": "unknown status"}])
        if created_from and created_to and created_from > created_to:
            raise ApiProblem(400, "validation_error", "created_from is after created_to",
                             errors=[{"field": "created_from", "message": "after created_to"}])
        try:
            rows, has_more = await anyio.to_thread.run_sync(lambda: services.views.payments(
                scope_of(principal), status=status, created_from=created_from, created_to=created_to,
                limit=limit, starting_after=starting_after))
        except ValueError as error:  # an unknown (or another merchant's) cursor
            raise ApiProblem(400, "validation_error", str(error),
                             errors=[{"field": "starting_after", "message": "not a payment you can see"}]) from None
        data = [payment_from_row(r) for r in rows]
        return schemas.PaymentList(data=data, has_more=has_more,
                                   next_starting_after=data[-1].id if has_more and data else None)

    @get("/{payment_id:uuid}", operation_id="getPayment", summary="A payment with its event timeline",
         responses=problems())
    async def read(self, payment_id: UUID, services: ApiServices, principal: Principal,
                   as_of: Annotated[datetime | None, AS_OF] = None) -> schemas.Payment:
        require(principal, "merchant", "admin")
        if as_of is not None:
            return await anyio.to_thread.run_sync(lambda: _payment_as_of(services, principal, payment_id, as_of))
        row = await anyio.to_thread.run_sync(lambda: services.views.payment(scope_of(principal), payment_id))
        if row is None:
            raise ApiProblem(404, "not_found", f"no payment {payment_id}")
        return payment_from_row(row)

    @post("/{payment_id:uuid}/capture", operation_id="capturePayment", status_code=200,
          summary="Capture all or part of an authorized payment",
          responses={**command(200, schemas.Payment, "the captured payment"), **PROCESSOR_PROBLEMS})
    async def capture(self, request: Request[Any, Any, Any], payment_id: UUID, services: ApiServices,
                      principal: Principal, data: schemas.PaymentCapture | None = None) -> Response[bytes]:
        merchant_id = merchant_scope(principal)
        body = data or schemas.PaymentCapture()

        def run(command_id: str) -> tuple[int, Any]:
            result = services.ledger.capture_payment(command_id, payment_id, amount_minor=body.amount,
                                                     merchant_id=merchant_id)
            return 200, payment_from_aggregate(services.ledger.get_payment(payment_id), result.position)

        return await run_command(request, services, principal, body, run)

    @post("/{payment_id:uuid}/void", operation_id="voidPayment", status_code=200,
          summary="Release an authorization that will not be captured",
          responses={**command(200, schemas.Payment, "the voided payment"), **PROCESSOR_PROBLEMS})
    async def void(self, request: Request[Any, Any, Any], payment_id: UUID, services: ApiServices,
                   principal: Principal, data: schemas.PaymentVoid | None = None) -> Response[bytes]:
        merchant_id = merchant_scope(principal)
        body = data or schemas.PaymentVoid()

        def run(command_id: str) -> tuple[int, Any]:
            result = services.ledger.void_payment(command_id, payment_id, reason=body.reason,
                                                  merchant_id=merchant_id)
            return 200, payment_from_aggregate(services.ledger.get_payment(payment_id), result.position)

        return await run_command(request, services, principal, body, run)

    @post("/{payment_id:uuid}/refunds", operation_id="refundPayment", status_code=201,
          summary="Refund part or all of a captured payment",
          responses={**command(201, schemas.Payment, "the payment, with the new refund's id"), **PROCESSOR_PROBLEMS})
    async def refund(self, request: Request[Any, Any, Any], payment_id: UUID, data: schemas.RefundCreate,
                     services: ApiServices, principal: Principal) -> Response[bytes]:
        merchant_id = merchant_scope(principal)

        def run(command_id: str) -> tuple[int, Any]:
            result = services.ledger.refund_payment(command_id, payment_id, amount_minor=data.amount,
                                                    reason=data.reason, merchant_id=merchant_id)
            payment = services.ledger.get_payment(payment_id)
            return 201, payment_from_aggregate(payment, result.position, refund_id=result.result["refund_id"])

        return await run_command(request, services, principal, data, run)


class BalanceController(Controller):
    path = "/v1/balances"
    tags = ["merchants"]  # noqa: RUF012  (Litestar's layer attribute)

    @get("/", operation_id="listBalances", summary="Ledger balances per account and currency, now or as of a time",
         responses=problems())
    async def balances(self, services: ApiServices, principal: Principal,
                       as_of: Annotated[datetime | None, AS_OF] = None) -> schemas.BalanceList:
        require(principal, "merchant", "admin")
        scope = scope_of(principal)
        try:
            rows = await anyio.to_thread.run_sync(lambda: services.views.balances(scope) if as_of is None
                                                  else services.views.balances_as_of(scope, as_of))
        except OutOfRange as error:
            raise out_of_range(error) from None
        return schemas.BalanceList(data=[
            schemas.Balance(account=r["account"], currency=r["currency"], balance=int(r["balance_minor"]))
            for r in rows
        ], merchants=balance_split(rows))

    @get("/history", operation_id="getBalanceHistory", responses=problems(),
         summary="One account's balance at the end of each hour or day, per currency, for a chart")
    async def history(
        self, services: ApiServices, principal: Principal,
        account: Annotated[str, Parameter(min_length=1, max_length=200, description="e.g. merchant:<id>:payable")],
        date_from: Annotated[datetime, Parameter(query="from", description="RFC 3339")],
        date_to: Annotated[datetime, Parameter(query="to", description="RFC 3339; not in the future, not before the"
                                               f" account's first posting, at most {MAX_HISTORY_POINTS} buckets"
                                               " after from")],
        granularity: Literal["hour", "day"] = "day",
    ) -> schemas.BalanceHistory:
        require(principal, "merchant", "admin")
        try:
            history = await anyio.to_thread.run_sync(lambda: services.views.balance_history(
                scope_of(principal), account, date_from=date_from, date_to=date_to, granularity=granularity))
        except OutOfRange as error:
            raise out_of_range(error) from None
        if history is None:  # no posting this key may see: another merchant's account is as unknown
            raise ApiProblem(404, "not_found", f"no account {account}")
        return schemas.BalanceHistory(
            account=account, granularity=granularity, date_from=date_from, date_to=date_to,
            series=[schemas.BalanceSeries(currency=s["currency"], points=[
                schemas.BalancePoint(period_start=p["period_start"], as_of=p["as_of"], balance=p["balance_minor"])
                for p in s["points"]]) for s in history["series"]])


def _payment_as_of(services: ApiServices, principal: Principal, payment_id: UUID, as_of: datetime) -> schemas.Payment:
    """The payment rebuilt from its events up to ``as_of`` (the event store's, not the read
    model's), with its timeline up to the same version."""
    try:
        check_moment("as_of", as_of)
        payment = services.ledger.get_payment_as_of(payment_id, as_of, merchant_id=principal.merchant_id)
    except OutOfRange as error:
        raise out_of_range(error) from None
    except NotFound:  # another merchant's payment answers as a missing one, as without as_of
        raise ApiProblem(404, "not_found", f"no payment {payment_id}") from None
    if payment is None:
        raise ApiProblem(400, "validation_error", f"as_of is before payment {payment_id} existed",
                         errors=[{"field": "as_of", "message": "before the payment existed"}])
    row = services.views.payment(scope_of(principal), payment_id)
    timeline = None if row is None else [
        schemas.TimelineEntry(event_type=t["event_type"], version=int(t["version"]), occurred_at=t["occurred_at"],
                              data=t["data"])
        for t in row["timeline"] if int(t["version"]) <= payment.version]
    return payment_from_aggregate(payment, None, timeline=timeline)


BUCKETS = {"payable": "pending", "available": "available", "reserved": "reserved", "in_transit": "in_transit"}


def balance_split(rows: list[dict[str, Any]]) -> list[schemas.BalanceSplit]:
    """Each merchant's accounts (domain/ledger.py) as what we owe it per bucket: a merchant's
    accounts are credits, so the owed amount is the balance negated."""
    split: dict[tuple[str, str], dict[str, int]] = {}
    for r in rows:
        kind, merchant_id, bucket = [*r["account"].split(":"), "", ""][:3]
        if kind == "merchant" and bucket in BUCKETS:
            owed = split.setdefault((merchant_id, r["currency"]), dict.fromkeys(BUCKETS.values(), 0))
            owed[BUCKETS[bucket]] = -int(r["balance_minor"])
    return [schemas.BalanceSplit(merchant_id=m, currency=c, **owed) for (m, c), owed in sorted(split.items())]
