"""Finishes payments that a crash or a silent processor left half way, every so often:

* ``processing`` for a while (the processor timed out): resolved by asking their processor with
  the same idempotency key, never by charging again;
* ``initiated`` for a while (the card was attached, then the request died before authorization
  started, so no processor heard of it): failed with ``authorization_not_started``, and the
  customer is taken back to the card step."""

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


def stuck_payments(database_url: str, older_than: timedelta, limit: int = 100,
                   status: str = "processing") -> list[Any]:
    """From the status read model: it may lag, and a payment resolved meanwhile is a no-op."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT payment_id FROM payment_status WHERE status = %s AND updated_at < now() - %s"
            " ORDER BY updated_at LIMIT %s",
            (status, older_than, limit),
        ).fetchall()
    return [row[0] for row in rows]


def resolve_stuck(ledger: Ledger, database_url: str, older_than: timedelta = timedelta(seconds=30)) -> int:
    resolved = 0
    for payment_id in stuck_payments(database_url, older_than, status="initiated"):
        try:
            result = ledger.abandon_unstarted_payment(payment_id)
        except (ProcessorUnavailable, DomainError) as error:  # busy (a request holds it), or moved on
            log.info("unstarted_payment_left", payment_id=str(payment_id), error=str(error))
            continue
        if not result.replayed and result.result.get("status") == "failed":
            resolved += 1
            log.warning("unstarted_payment_failed", payment_id=str(payment_id))
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
