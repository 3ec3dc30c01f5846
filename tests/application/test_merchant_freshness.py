"""A merchant read by commands is kept in memory (application/unit_of_work.py
``merchant_to_read``): a change saved by the same ledger applies to its very next command; one
saved by another process (another Ledger on the same event store) within MERCHANT_FRESH_S."""

from __future__ import annotations

import pytest

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from api.bootstrap import build_ledger
from api.settings import Settings
from application import unit_of_work
from application.ledger import Ledger
from domain.errors import MerchantLimitExceeded
from tests.application.flows import new_merchant, open_session


def test_a_limit_set_elsewhere_applies_once_the_kept_merchant_is_checked_again(
    ledger: Ledger, settings: Settings, database_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(unit_of_work, "MERCHANT_FRESH_S", 3600.0)  # "within" however slow the machine
    other = build_ledger(settings, database_url, clock=clock, processor=SandboxProcessor())  # another process
    try:
        merchant_id = new_merchant(ledger, command_id="fresh-merchant")
        open_session(ledger, merchant_id, command_id="fresh-1", amount_minor=2_500)  # kept now
        other.change_merchant_settings("fresh:limit", merchant_id, max_amount_minor={"USD": 1_000})
        # Within MERCHANT_FRESH_S the kept merchant is used as it is ...
        open_session(ledger, merchant_id, command_id="fresh-2", amount_minor=2_500)
        # ... and once that has passed, it is checked against the event store and replaced.
        monkeypatch.setattr(unit_of_work, "MERCHANT_FRESH_S", 0.0)
        with pytest.raises(MerchantLimitExceeded):
            open_session(ledger, merchant_id, command_id="fresh-3", amount_minor=2_500)
        # The ledger that saved a change sees it at once, whatever the period.
        monkeypatch.setattr(unit_of_work, "MERCHANT_FRESH_S", 3600.0)
        open_session(ledger, merchant_id, command_id="fresh-3b", amount_minor=900)  # kept again
        ledger.change_merchant_settings("fresh:unlimit", merchant_id, max_amount_minor={})
        open_session(ledger, merchant_id, command_id="fresh-4", amount_minor=2_500)
    finally:
        other.close()
