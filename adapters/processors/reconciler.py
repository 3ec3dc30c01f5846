"""Reconciles each processor's closed days, every so often, inside ``echotransact dispatch``
(and so inside ``echotransact run``): yesterday's settlement report (UTC), in every currency the
processor took payments in. A day already reconciled answers its first result at once, so the
loop may run as often as it likes; a processor that cannot be asked now is asked next round."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

import psycopg
import structlog

from application.errors import ProcessorUnavailable
from application.ledger import Ledger
from domain.errors import DomainError

log = structlog.get_logger(__name__)


def currencies_of(database_url: str, processor: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT DISTINCT currency FROM payment_status WHERE processor = %s ORDER BY currency",
                            (processor,)).fetchall()
    return [row[0] for row in rows]


def reconcile_day(ledger: Ledger, database_url: str, processors: Iterable[str], day: date) -> int:
    """Reconcile ``day`` for every processor and currency; how many were reconciled now."""
    done = 0
    for processor in processors:
        for currency in currencies_of(database_url, processor):
            try:
                result = ledger.reconcile(processor, day, currency)
            except ProcessorUnavailable as error:
                log.info("reconciliation_deferred", processor=processor, day=str(day), error=str(error))
                continue
            except DomainError as error:  # a malformed report: refused whole, tried again next round
                log.error("reconciliation_refused", processor=processor, day=str(day), currency=currency,
                          code=error.code, error=str(error))
                continue
            if not result.replayed:
                done += 1
                log.info("reconciled", processor=processor, day=str(day), currency=currency,
                         counts=result.result["counts"], settled=result.result["settled"])
    return done


def run_reconciler(ledger: Ledger, database_url: str, processors: Iterable[str], stop: threading.Event,
                   every_s: float = 3600.0) -> None:
    names = list(processors)
    while True:
        try:
            reconcile_day(ledger, database_url, names, datetime.now(UTC).date() - timedelta(days=1))
        except psycopg.Error as error:
            log.warning("reconciler_database_error", error=str(error))
        if stop.wait(every_s):
            return
