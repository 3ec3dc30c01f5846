"""The analytics projection's card step and decline reasons on real PostgreSQL: the card counted
once per session, processor and risk decline reasons per day, merchant, voice platform and
currency whatever order the aggregates' events arrive in, a rebuild equal to the live rows
(`replay --verify`), and a merchant reading only its own reasons."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest

from api.bootstrap import envelope_opener
from api.settings import Settings
from application.envelope import EventEnvelope
from application.ledger import Ledger
from projections.engine import ProjectionStore
from projections.registry import all_projections
from projections.replay import verify
from projections.views import ReadViews, Scope
from tests.application.flows import PHONE, new_merchant, pay
from tests.projections.test_engine import feed


def open_on(ledger: Ledger, merchant_id: UUID, command_id: str, platform: str, amount_minor: int = 2_500,
            currency: str = "USD") -> UUID:
    result = ledger.open_session(
        command_id, merchant_id=merchant_id, amount_minor=amount_minor, currency=currency, customer_phone=PHONE,
        order_reference=f"ORDER-{command_id}",
        line_items=[{"sku": "PZ-L", "name": "Large pizza", "quantity": 1, "unit_amount_minor": amount_minor}],
        voice_platform=platform, conversation_id="conv-1")
    return UUID(result.result["session_id"])


def history(ledger: Ledger) -> dict[str, UUID]:
    """Merchant A: on alexa, a card declined by the processor then a second card paid (one
    session, two cards); on google_assistant, a payment the risk rules declined (the merchant's
    limit lowered after the session opened). Merchant B: one processor decline on alexa."""
    a, b = new_merchant(ledger, "m-a"), new_merchant(ledger, "m-b")
    s1 = open_on(ledger, a, "s1", "alexa")
    declined = pay(ledger, s1, last4="0002", prefix="s1-")
    ledger.authorize_payment(declined)
    again = UUID(ledger.attach_payment_method("s1-again", s1, card_token="t", card_brand="visa",
                                              card_last4="4242").result["payment_id"])
    ledger.authorize_payment(again)
    s2 = open_on(ledger, a, "s2", "google_assistant", amount_minor=5_000)
    risky = pay(ledger, s2, prefix="s2-")
    ledger.change_merchant_settings("limit-a", a, max_amount_minor={"USD": 1_000})
    ledger.authorize_payment(risky)
    s3 = open_on(ledger, b, "s3", "alexa")
    ledger.authorize_payment(pay(ledger, s3, last4="0002", prefix="s3-"))
    return {"a": a, "b": b, "s1": s1, "s2": s2, "s3": s3, "risky": risky}


@pytest.fixture
def store(database_url: str, settings: Settings) -> Iterator[ProjectionStore]:
    s = ProjectionStore(database_url, list(all_projections().values()), envelope_opener(settings))
    yield s
    s.close()


def reasons(database_url: str) -> dict[tuple[str, str, str, str, str], int]:
    with psycopg.connect(database_url) as conn:
        found = conn.execute("SELECT merchant_id, voice_platform, currency, kind, reason, sum(payments)"
                             " FROM decline_reasons_daily GROUP BY 1, 2, 3, 4, 5").fetchall()
    return {(str(m), p, c, k, r): int(n) for m, p, c, k, r, n in found}


def funnel(database_url: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    with psycopg.connect(database_url) as conn:
        found = conn.execute("SELECT merchant_id, voice_platform, sum(code_verified), sum(card_attached), sum(paid)"
                             " FROM funnel_daily GROUP BY 1, 2").fetchall()
    return {(str(m), p): (int(v), int(c), int(paid)) for m, p, v, c, paid in found}


def test_the_card_step_counts_sessions_and_reasons_land_under_their_platform_and_currency(
    ledger: Ledger, store: ProjectionStore, database_url: str, settings: Settings,
) -> None:
    ids = history(ledger)
    events = feed(database_url, settings)
    assert sum(e.event_type == "payment_session.payment_method_attached" for e in events) == 4
    store.catch_up(grace=timedelta(0))
    a, b = str(ids["a"]), str(ids["b"])
    # Session 1 tried two cards: one session reached the card step. Session 2 reached it and
    # was declined by the risk rules; B's session reached it and was declined.
    assert funnel(database_url) == {(a, "alexa"): (1, 1, 1), (a, "google_assistant"): (1, 1, 0),
                                    (b, "alexa"): (1, 1, 0)}
    declined = {e.data["reason_code"] for e in events if e.event_type == "payment.failed"} - {"risk_declined"}
    assert len(declined) == 1  # the sandbox's code for the 0002 card
    [code] = declined
    [risk] = [e.data for e in events if e.event_type == "payment.risk_assessed" and e.data["decision"] == "decline"]
    assert risk["reasons"] and "amount_above_merchant_limit" in risk["reasons"]
    assert reasons(database_url) == {
        (a, "alexa", "USD", "decline", code): 1,
        (a, "google_assistant", "USD", "decline", "risk_declined"): 1,
        **{(a, "google_assistant", "USD", "risk", r): 1 for r in risk["reasons"]},
        (b, "alexa", "USD", "decline", code): 1,
    }


def test_any_arrival_order_gives_the_rows_of_a_rebuild(
    ledger: Ledger, store: ProjectionStore, database_url: str, owner_database_url: str, settings: Settings,
) -> None:
    history(ledger)
    events: list[EventEnvelope] = feed(database_url, settings)
    # Payments' events before their sessions' (the topics are separate), duplicates, small batches.
    payments_first = sorted(events * 2, key=lambda e: (e.aggregate_type != "payment", random.Random(3).random()))
    for start in range(0, len(payments_first), 5):
        store.apply_batch(payments_first[start:start + 5])
    store.catch_up(grace=timedelta(0))
    live = reasons(database_url)
    # Three declines (two by the processor, one by the risk rules), and each reason the rules gave.
    assert sum(n for r, n in live.items() if r[3] == "decline") == 3 and any(r[3] == "risk" for r in live)
    assert all(platform != "unknown" for _, platform, *_ in live)
    # replay --verify rebuilds every projection into scratch tables and compares: nothing differs.
    assert verify(owner_database_url, list(all_projections().values()), envelope_opener(settings)) == []
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM analytics_payment_reasons WHERE NOT counted").fetchone() == (0,)


def test_a_merchant_reads_only_its_own_reasons(
    ledger: Ledger, store: ProjectionStore, database_url: str, settings: Settings,
) -> None:
    ids = history(ledger)
    store.catch_up(grace=timedelta(0))
    with psycopg.connect(database_url) as conn:
        first, last = conn.execute("SELECT min(day), max(day) FROM decline_reasons_daily").fetchone()  # type: ignore[misc]
    window: dict[str, Any] = {"date_from": first, "date_to": last}
    with ReadViews(database_url) as views:
        everyone = views.decline_reasons(Scope("analyst"), **window)
        assert sum(r["payments"] for r in everyone) == sum(reasons(database_url).values())
        own_a = views.decline_reasons(Scope("merchant", ids["a"]), **window)
        own_b = views.decline_reasons(Scope("merchant", ids["b"]), **window)
        assert {r["voice_platform"] for r in own_a} == {"alexa", "google_assistant"}
        assert [(r["voice_platform"], r["kind"]) for r in own_b] == [("alexa", "decline")]
        # Asking for the other merchant by filter finds nothing: the rows are not there for B.
        assert views.decline_reasons(Scope("merchant", ids["b"]), **window, merchant_id=ids["a"]) == []
        assert views.decline_reasons(Scope("admin"), **window, merchant_id=ids["b"]) == own_b
        assert views.decline_reasons(Scope("compliance"), **window, voice_platform="google_assistant",
                                     currency="USD") == [r for r in own_a if r["voice_platform"] == "google_assistant"]
        assert views.decline_reasons(Scope("analyst"), **window, currency="EUR") == []
        with pytest.raises(ValueError, match="after"):
            views.decline_reasons(Scope("analyst"), date_from=last + timedelta(days=1), date_to=last)
