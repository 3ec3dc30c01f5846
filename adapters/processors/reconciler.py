"""Reconciles each processor's closed days, every so often, inside ``echotransact dispatch``
(and so inside ``echotransact run``): the settlement reports (UTC days) of the last few days up
to ``delay_days`` ago (1: up to yesterday), in every currency the processor took payments in.
A day already reconciled answers its first result at once, so the loop may run as often as it
likes; a day the processor has not closed yet (a preliminary report), and a processor that
cannot be asked now, are asked again next round."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

import psycopg
import structlog

from application.errors import ProcessorUnavailable
from application.ledger import Ledger
from domain.errors import DomainError
from domain.reconciliation import ReportNotFinal

# Days looked at behind the newest one due: a day a processor closed late is still reconciled.
LOOK_BACK_DAYS = 3

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
            except (ProcessorUnavailable, ReportNotFinal) as error:
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
                   every_s: float = 3600.0, delay_days: int = 1) -> None:
    names = list(processors)
    while True:
        try:
            newest = datetime.now(UTC).date() - timedelta(days=delay_days)
            for back in reversed(range(LOOK_BACK_DAYS)):
                reconcile_day(ledger, database_url, names, newest - timedelta(days=back))
        except psycopg.Error as error:
            log.warning("reconciler_database_error", error=str(error))
        if stop.wait(every_s):
            return
