"""The dispute clock, inside ``echotransact dispatch`` (and so ``echotransact run``): every so
often, each dispute awaiting the merchant's answer gets its reminder when the evidence is due
soon, and expires once the due date passed unanswered (application/disputes.py tend_dispute).
A dispute already tended answers its recorded result; one that fails is tried next round."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import psycopg
import structlog

from adapters.postgres.disputes import disputes_due
from application.disputes import DUE_SOON
from application.ledger import Ledger
from domain.errors import DomainError

log = structlog.get_logger(__name__)


def tend_disputes(ledger: Ledger, database_url: str) -> int:
    """One round; how many disputes changed."""
    changed = 0
    for the_dispute in disputes_due(database_url, datetime.now(UTC) + DUE_SOON):
        try:
            result = ledger.tend_dispute(the_dispute)
        except DomainError as error:
            log.warning("dispute_not_tended", dispute_id=str(the_dispute), code=error.code, error=str(error))
            continue
        if result is not None and not result.replayed:
            changed += 1
            log.info("dispute_tended", dispute_id=str(the_dispute), status=result.result["status"])
    return changed


def run_dispute_clock(ledger: Ledger, database_url: str, stop: threading.Event, every_s: float = 60.0) -> None:
    while True:
        try:
            tend_disputes(ledger, database_url)
        except psycopg.Error as error:
            log.warning("dispute_clock_database_error", error=str(error))
        except Exception:  # a bug must not end the loop
            log.exception("dispute_clock_round_failed")
        if stop.wait(every_s):
            return
