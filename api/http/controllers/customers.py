"""Admins: a customer's personal data, erased (crypto-shredding) or exported (subject access).

The phone travels only in request bodies, never in a path or query (so never in a logged URL)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import redis
import structlog
from litestar import Controller, Request, Response, post

from api.http import schemas
from api.http.auth import Principal, require
from api.http.commands import run_command
from api.http.openapi import command, problems
from api.http.services import ApiServices
from application.privacy import Erasure
from projections.status_cache import forget

log = structlog.get_logger(__name__)


def forget_sessions(client: Any, session_ids: Sequence[UUID]) -> None:
    """Drop the status cache's copies of these sessions (they showed the phone's last four and the
    cancellation's words); the next read fills it from the read model, which shows ``erased``."""
    if session_ids:
        try:
            forget(client, "session", session_ids)
        except redis.RedisError:  # the cache expires within the hour anyway (TTL_S)
            log.warning("status_cache_forget_failed", sessions=len(session_ids))


def erasure_out(erasure: Erasure) -> schemas.CustomerErasure:
    result = erasure.result.result
    return schemas.CustomerErasure(
        erased=bool(result["erased"]), customer_ids=list(result["customer_ids"]),
        erased_at=datetime.fromisoformat(result["erased_at"]),
        keys_destroyed=sum(s.keys_destroyed for s in erasure.scrubbed), sessions=len(erasure.session_ids),
    )


class CustomerController(Controller):
    path = "/v1/customers"
    tags = ["admin"]  # noqa: RUF012  (Litestar's layer attribute)

    @post("/erasures", operation_id="eraseCustomer", status_code=200,
          summary="Erase a customer's personal data: destroy their data key (idempotent)",
          responses=command(200, schemas.CustomerErasure, "what the erasure did (never the phone)"))
    async def erase(self, request: Request[Any, Any, Any], data: schemas.CustomerErasureCreate,
                    services: ApiServices, principal: Principal) -> Response[bytes]:
        require(principal, "admin")

        def run(command_id: str) -> tuple[int, Any]:
            erasure = services.ledger.erase_customer(
                command_id, phone=data.customer_phone, erased_by=f"api_key:{principal.key_id}", reason=data.reason)
            forget_sessions(services.redis, erasure.session_ids)  # the status cache's copies
            return 200, erasure_out(erasure)

        return await run_command(request, services, principal, data, run)

    @post("/exports", operation_id="exportCustomer", status_code=200,
          summary="Everything held about a customer (a subject access request)", responses=problems())
    async def export(self, data: schemas.CustomerExportCreate, services: ApiServices,
                     principal: Principal) -> dict[str, Any]:
        require(principal, "admin")
        return await anyio.to_thread.run_sync(services.ledger.export_customer, data.customer_phone)
