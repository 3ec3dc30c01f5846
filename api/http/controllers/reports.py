"""Analysts: the conversion funnel and money volumes. Compliance: the audit trail.

Every read goes through the read views (projections/views.py), as the reader role with the
caller's scope, so row-level security applies to reports as to everything else.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

import anyio
from litestar import Controller, get
from litestar.params import Parameter
from litestar.response import Stream

from api.http.auth import Principal, require
from api.http.controllers.payments import scope_of
from api.http.openapi import problems
from api.http.problems import ApiProblem
from api.http.services import ApiServices


def _range(date_from: date, date_to: date) -> None:
    if date_from > date_to:
        raise ApiProblem(400, "validation_error", "from is after to",
                         errors=[{"field": "from", "message": "after to"}])
    if (date_to - date_from).days > 366 * 3:
        raise ApiProblem(400, "validation_error", "a range covers at most three years",
                         errors=[{"field": "to", "message": "range too long"}])


def _merchant_filter(principal: Principal, merchant_id: UUID | None) -> UUID | None:
    # A merchant's own key sees only its own numbers, whatever it asks for.
    return principal.merchant_id if principal.role == "merchant" else merchant_id


class AnalyticsController(Controller):
    path = "/v1/analytics"
    tags = ["analysts"]  # noqa: RUF012  (Litestar's layer attribute)

    @get("/funnel", operation_id="getFunnel", summary="Conversion funnel per day and voice platform",
         responses=problems())
    async def funnel(
        self, services: ApiServices, principal: Principal,
        date_from: Annotated[date, Parameter(query="from")],
        date_to: Annotated[date, Parameter(query="to")],
        merchant_id: UUID | None = None,
        voice_platform: Annotated[str | None, Parameter(max_length=50)] = None,
    ) -> dict[str, Any]:
        require(principal, "analyst", "admin", "merchant")
        _range(date_from, date_to)
        rows = await anyio.to_thread.run_sync(lambda: services.views.funnel(
            scope_of(principal), date_from=date_from, date_to=date_to,
            merchant_id=_merchant_filter(principal, merchant_id), voice_platform=voice_platform))
        return {"data": rows}

    @get("/volume", operation_id="getVolume", summary="Volumes, approval rate and average order value",
         responses=problems())
    async def volume(
        self, services: ApiServices, principal: Principal,
        date_from: Annotated[date, Parameter(query="from")],
        date_to: Annotated[date, Parameter(query="to")],
        granularity: Literal["day", "week", "month"] = "day",
        currency: Annotated[str | None, Parameter(pattern="^[A-Z]{3}$")] = None,
        merchant_id: UUID | None = None,
    ) -> dict[str, Any]:
        require(principal, "analyst", "admin", "merchant")
        _range(date_from, date_to)
        rows = await anyio.to_thread.run_sync(lambda: services.views.volume(
            scope_of(principal), date_from=date_from, date_to=date_to, granularity=granularity,
            currency=currency, merchant_id=_merchant_filter(principal, merchant_id)))
        return {"data": rows}


    @get("/disputes", operation_id="getDisputeRates",
         summary="Dispute rate and win rate per merchant and currency, by count and by amount", responses=problems())
    async def disputes(
        self, services: ApiServices, principal: Principal,
        date_from: Annotated[date, Parameter(query="from")],
        date_to: Annotated[date, Parameter(query="to")],
        merchant_id: UUID | None = None,
    ) -> dict[str, Any]:
        require(principal, "analyst", "admin", "merchant")
        _range(date_from, date_to)
        rows = await anyio.to_thread.run_sync(lambda: services.views.dispute_rates(
            scope_of(principal), date_from=date_from, date_to=date_to,
            merchant_id=_merchant_filter(principal, merchant_id)))
        return {"data": rows}


class AuditController(Controller):
    path = "/v1/audit"
    tags = ["compliance"]  # noqa: RUF012  (Litestar's layer attribute)

    @get("/events", operation_id="listAuditEvents", summary="The audit trail, personal data masked",
         responses=problems())
    async def events(
        self, services: ApiServices, principal: Principal,
        aggregate_id: UUID | None = None, merchant_id: UUID | None = None,
        from_position: Annotated[int, Parameter(ge=0)] = 0,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        require(principal, "compliance")
        rows = await anyio.to_thread.run_sync(lambda: services.views.audit_events(
            scope_of(principal), aggregate_id=aggregate_id, merchant_id=merchant_id,
            from_position=from_position, limit=limit))
        return {"data": rows, "next_from_position": rows[-1]["position"] if rows else from_position}

    @get("/verify", operation_id="verifyAudit", summary="Check the hash chain; names the first broken row",
         responses=problems())
    async def verify(self, services: ApiServices, principal: Principal) -> dict[str, Any]:
        require(principal, "compliance")

        def check() -> dict[str, Any]:
            report = services.views.verify_audit_chain(scope_of(principal))
            return {"ok": report.ok, "rows_checked": report.rows_checked, "unchained": report.unchained,
                    "first_broken_position": report.first_broken_position, "reason": report.reason}

        return await anyio.to_thread.run_sync(check)

    @get("/export", operation_id="exportAudit", summary="The audit trail as JSON Lines (streamed)",
         media_type="application/x-ndjson", responses=problems())
    async def export(
        self, services: ApiServices, principal: Principal,
        aggregate_id: UUID | None = None, merchant_id: UUID | None = None,
        date_from: Annotated[date | None, Parameter(query="from")] = None,
        date_to: Annotated[date | None, Parameter(query="to")] = None,
    ) -> Stream:
        require(principal, "compliance")
        if date_from and date_to:
            _range(date_from, date_to)
        if date_to is not None and date_to >= date.max:
            raise ApiProblem(400, "validation_error", "to must be a day before 9999-12-31",
                             errors=[{"field": "to", "message": "out of range"}])

        since = datetime.combine(date_from, time(), UTC) if date_from else None
        until = datetime.combine(date_to + timedelta(days=1), time(), UTC) if date_to else None
        scope = scope_of(principal)

        async def lines() -> AsyncIterator[bytes]:
            send, receive = anyio.create_memory_object_stream[bytes](100)

            def produce() -> None:
                rows = services.views.audit_export(scope, aggregate_id=aggregate_id, merchant_id=merchant_id,
                                                   since=since, until=until)
                # closing(): a client that goes away ends the export's transaction at once.
                with closing(rows):
                    for row in rows:
                        anyio.from_thread.run(send.send, (json.dumps(row, default=str, sort_keys=True) + "\n").encode())
                anyio.from_thread.run(send.aclose)

            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, produce)
                async with receive:
                    async for chunk in receive:
                        yield chunk

        return Stream(lines(), media_type="application/x-ndjson")
