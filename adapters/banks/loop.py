"""Pays merchants out, every so often, inside ``echotransact dispatch`` (and so inside
``echotransact run``): today's payouts of every merchant whose schedule has a cut-off today, then
every payout still with the bank, sent again with its own key (application/payouts.py). A round
that finds the database or the bank away is simply the next round's work."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import psycopg
import structlog

from application.ledger import Ledger
from application.payouts import PayoutRun

log = structlog.get_logger(__name__)


def pay_out_once(ledger: Ledger) -> PayoutRun:
    run = ledger.run_payouts(datetime.now(UTC).date())
    for created in run.created:
        log.info("payout_created", **{k: created[k] for k in ("payout_id", "merchant_id", "currency", "status",
                                                               "amount_minor")})
    for sent in run.sent:
        log.info("payout_sent", payout_id=sent["payout_id"], status=sent["status"],
                 bank_reference=sent["bank_reference"], failure_reason=sent["failure_reason"])
    for payout_id, why in run.unsent.items():
        log.warning("payout_deferred", payout_id=payout_id, error=why)
    for which, why in run.refused.items():
        log.error("payout_refused", merchant_currency=which, error=why)
    return run


def run_payouts(ledger: Ledger, stop: threading.Event, every_s: float = 60.0) -> None:
    while True:
        try:
            pay_out_once(ledger)
        except psycopg.Error as error:
            log.warning("payouts_database_error", error=str(error))
        except Exception:  # a bug (or a bank that breaks its protocol) must not end the loop
            log.exception("payouts_round_failed")
        if stop.wait(every_s):
            return
