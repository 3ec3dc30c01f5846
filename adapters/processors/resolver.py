"""Settles authorizations whose outcome was unknown (the processor timed out): every so often,
payments that have been processing for a while are resolved by asking their processor with the
same idempotency key, never by charging again."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import psycopg
import structlog

from application.errors import ProcessorUnavailable
from application.ledger import Ledger
from domain.errors import DomainError

log = structlog.get_logger(__name__)


def stuck_payments(database_url: str, older_than: timedelta, limit: int = 100) -> list[Any]:
    """From the status read model: it may lag, and a payment resolved meanwhile is a no-op."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT payment_id FROM payment_status WHERE status = 'processing' AND updated_at < now() - %s"
            " ORDER BY updated_at LIMIT %s",
            (older_than, limit),
        ).fetchall()
    return [row[0] for row in rows]


def resolve_stuck(ledger: Ledger, database_url: str, older_than: timedelta = timedelta(seconds=30)) -> int:
    resolved = 0
    for payment_id in stuck_payments(database_url, older_than):
        try:
            result = ledger.resolve_authorization(payment_id)
        except ProcessorUnavailable:
            continue  # still no answer: next round
        except DomainError as error:
            log.warning("resolve_authorization_refused", payment_id=str(payment_id), code=error.code)
            continue
        resolved += 1
        log.info("authorization_resolved", payment_id=str(payment_id), status=result.result.get("status"))
    return resolved


def run_resolver(ledger: Ledger, database_url: str, stop: threading.Event, every_s: float = 15.0,
                 older_than: timedelta = timedelta(seconds=30)) -> None:
    while not stop.wait(every_s):
        try:
            resolve_stuck(ledger, database_url, older_than)
        except psycopg.Error as error:
            log.warning("resolver_database_error", error=str(error))
