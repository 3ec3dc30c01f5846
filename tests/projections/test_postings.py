"""Balances as of a moment on real PostgreSQL (ledger_postings, ReadViews.balances_as_of and
balance_history): random payments captured, refunded and settled at controlled times, then for
random cut-off times the as-of balances equal the sums of the postings up to then, computed here
from the event feed; the platform's balances sum to zero per currency at every cut-off; a
merchant sees only its own accounts; the history's points are the as-of balances at their ends."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import eventsourcing.domain
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.clock import ManualClock
from api.bootstrap import envelope_opener
from api.settings import Settings
from application.envelope import EventEnvelope
from application.ledger import Ledger
from projections.registry import all_projections
from projections.replay import verify
from projections.views import MAX_HISTORY_POINTS, OutOfRange, ReadViews, Scope
from tests.application.flows import new_merchant, open_session, pay
from tests.projections.test_engine import feed
from tests.projections.test_views import catch_up

START_AGO = timedelta(days=40)
Balances = dict[tuple[str, str], int]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """Events are stamped with this clock's time (the library stamps them with the real time), which
    starts 40 days ago and never runs ahead of the real time (each example advances it by two days at most)."""
    manual = ManualClock(datetime.now(UTC) - START_AGO)
    monkeypatch.setattr(eventsourcing.domain, "datetime_now_with_tzinfo", manual.now)
    return manual


@pytest.fixture
def views(database_url: str) -> Iterator[ReadViews]:
    with ReadViews(database_url) as v:
        yield v


# A payment's story: its amount and currency, then steps, each after a pause in minutes.
@dataclass(frozen=True)
class Story:
    amount_minor: int
    currency: str
    capture_minor: int
    refunds_minor: list[int]
    settle: bool
    pauses_min: list[int] = field(default_factory=list)


@st.composite
def stories(draw: st.DrawFn) -> Story:
    amount = draw(st.integers(100, 9_000))
    capture = draw(st.integers(1, amount))
    refunds = draw(st.lists(st.integers(1, capture), max_size=2).filter(lambda r: sum(r) <= capture))
    return Story(amount, draw(st.sampled_from(["USD", "EUR"])), capture, refunds, draw(st.booleans()),
                 draw(st.lists(st.integers(0, 120), min_size=4, max_size=4)))


def live(ledger: Ledger, clock: ManualClock, merchant: UUID, story: Story) -> None:
    tag = uuid.uuid4().hex[:12]
    payment = pay(ledger, open_session(ledger, merchant, f"{tag}-session", amount_minor=story.amount_minor,
                                       currency=story.currency), prefix=f"{tag}-")
    ledger.authorize_payment(payment)
    pauses = iter(story.pauses_min)
    clock.advance(timedelta(minutes=next(pauses)))
    ledger.capture_payment(f"{tag}-capture", payment, amount_minor=story.capture_minor)
    for n, refund in enumerate(story.refunds_minor):
        clock.advance(timedelta(minutes=next(pauses)))
        ledger.refund_payment(f"{tag}-refund-{n}", payment, amount_minor=refund)
    if story.settle:
        clock.advance(timedelta(minutes=next(pauses)))
        ledger.settle_payment(payment, f"deposit-{tag}")


def expected_as_of(events: list[EventEnvelope], as_of: datetime) -> Balances:
    """The sums of the postings of the events that occurred by then, from the feed itself."""
    sums: Balances = defaultdict(int)
    for e in events:
        if e.occurred_at <= as_of:
            for p in e.data.get("postings") or []:
                sums[(p["account"], p["currency"])] += p["amount_minor"] if p["direction"] == "debit" \
                    else -p["amount_minor"]
    return dict(sums)


def as_dict(rows: list[dict[str, Any]]) -> Balances:
    return {(r["account"], r["currency"]): r["balance_minor"] for r in rows}


# A cut-off time: exactly at an event with postings (it counts), just before one (it does not), or
# anywhere from the clock's start to now; the fraction picks which (drawn as numbers, not from the
# database's events, so that hypothesis draws the same way on every run).
Cut = tuple[int, float]
CUTS = st.lists(st.tuples(st.integers(0, 2), st.floats(0, 1)), min_size=3, max_size=6)


def cut_off(cut: Cut, moments: list[datetime], start: datetime, now: datetime) -> datetime:
    kind, fraction = cut
    if kind == 2:
        return start + (now - start) * fraction
    moment = moments[round(fraction * (len(moments) - 1))]
    return moment if kind == 0 else moment - timedelta(microseconds=1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(per_merchant=st.lists(st.lists(stories(), min_size=1, max_size=3), min_size=1, max_size=2), cuts=CUTS,
       granularity=st.sampled_from(["hour", "day"]))
def test_balances_as_of_any_time_are_the_postings_up_to_then(
    ledger: Ledger, clock: ManualClock, database_url: str, settings: Settings, views: ReadViews,
    per_merchant: list[list[Story]], cuts: list[Cut], granularity: str,
) -> None:
    merchants = []
    for stories_of_one in per_merchant:
        merchant = new_merchant(ledger, f"m-{uuid.uuid4().hex}")
        merchants.append(merchant)
        for story in stories_of_one:
            clock.advance(timedelta(minutes=story.pauses_min[0] // 3))
            live(ledger, clock, merchant, story)
    catch_up(database_url, settings)
    events = feed(database_url, settings)
    moments = sorted({e.occurred_at for e in events if e.data.get("postings")})
    assert moments
    start, now = datetime.now(UTC) - START_AGO, clock.now()

    for cut in [*(cut_off(c, moments, start, now) for c in cuts), now]:
        expected = expected_as_of(events, cut)
        admin = as_dict(views.balances_as_of(Scope("admin"), cut))
        assert admin == expected, cut
        per_currency: dict[str, int] = defaultdict(int)
        for (_, currency), balance in admin.items():
            per_currency[currency] += balance
        assert all(total == 0 for total in per_currency.values()), (cut, dict(per_currency))
        for merchant in merchants:
            try:
                mine = as_dict(views.balances_as_of(Scope("merchant", merchant), cut))
            except OutOfRange as error:  # before its registration
                assert error.field == "as_of"
                assert all(not account.startswith(f"merchant:{merchant}:") for account, _ in expected)
                continue
            assert mine == {k: v for k, v in expected.items() if k[0].startswith(f"merchant:{merchant}:")}

    # Now, the as-of balances are the current ones.
    assert as_dict(views.balances_as_of(Scope("admin"), clock.now())) == as_dict(views.balances(Scope("admin")))

    # A history's points are the as-of balances at their ends.
    # (A capture smaller than our fee leaves the merchant nothing: then it has no account to chart.)
    first_posting = {p["account"]: e.occurred_at for e in reversed(events) for p in e.data.get("postings") or []}
    account = next((a for a in first_posting if a.startswith(f"merchant:{merchants[0]}:")), None)
    if account is None:
        return
    opened = first_posting[account]
    history = views.balance_history(Scope("merchant", merchants[0]), account, date_from=opened,
                                    date_to=now, granularity=granularity)  # type: ignore[arg-type]
    assert history is not None
    for series in history["series"]:
        for point in series["points"]:
            then = expected_as_of(events, point["as_of"])
            assert point["balance_minor"] == then.get((account, series["currency"]), 0), point
        assert series["points"][-1]["as_of"] == clock.now()


def test_a_history_refuses_what_it_cannot_answer_and_hides_other_merchants_accounts(
    ledger: Ledger, clock: ManualClock, database_url: str, settings: Settings, views: ReadViews,
) -> None:
    mine, theirs = new_merchant(ledger, "m-1"), new_merchant(ledger, "m-2")
    clock.advance(timedelta(days=1))
    live(ledger, clock, mine, Story(2_000, "USD", 2_000, [500], True, [60, 60, 60, 60]))
    live(ledger, clock, theirs, Story(1_000, "USD", 1_000, [], False, [60, 0, 0, 0]))
    catch_up(database_url, settings)
    account, now = f"merchant:{mine}:payable", clock.now()
    scope = Scope("merchant", mine)
    history = views.balance_history(scope, account, date_from=now - timedelta(hours=3), date_to=now,
                                    granularity="hour")
    assert history is not None and [s["currency"] for s in history["series"]] == ["USD"]
    # Captured, then refunded 500 an hour later, then settled (payable -> available) an hour after.
    assert [p["balance_minor"] for p in history["series"][0]["points"]][-1] == 0

    assert views.balance_history(Scope("merchant", theirs), account, date_from=now - timedelta(hours=1),
                                 date_to=now) is None  # as unknown as an account that does not exist
    assert views.balance_history(scope, "merchant:nobody:payable", date_from=now - timedelta(hours=1),
                                 date_to=now) is None
    refusals = {  # (from, to)
        "to": (now - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=5)),  # in the future
        "from": (now, now - timedelta(hours=1)),  # after to
    }
    for name, (date_from, date_to) in refusals.items():
        with pytest.raises(OutOfRange) as refused:
            views.balance_history(scope, account, date_from=date_from, date_to=date_to)
        assert refused.value.field == name
    with pytest.raises(OutOfRange, match="before account") as before:  # the window ends before its first posting
        views.balance_history(scope, account, date_from=now - timedelta(days=3), date_to=now - timedelta(days=2))
    assert before.value.field == "to"
    # A window that starts before the account existed is charted from 0.
    early = views.balance_history(scope, account, date_from=now - timedelta(days=2), date_to=now)
    assert early is not None and early["series"][0]["points"][0]["balance_minor"] == 0
    with pytest.raises(OutOfRange, match=f"at most {MAX_HISTORY_POINTS}") as too_long:
        views.balance_history(Scope("admin"), account, date_from=now - timedelta(hours=MAX_HISTORY_POINTS + 1),
                              date_to=now, granularity="hour")
    assert too_long.value.field == "to"
    with pytest.raises(OutOfRange, match="time zone"):
        views.balances_as_of(scope, now.replace(tzinfo=None))
    with pytest.raises(OutOfRange, match="before merchant"):
        views.balances_as_of(scope, now - START_AGO - timedelta(days=1))


def test_replay_verify_covers_the_postings(
    ledger: Ledger, clock: ManualClock, database_url: str, owner_database_url: str, settings: Settings,
) -> None:
    live(ledger, clock, new_merchant(ledger, "m-1"), Story(3_000, "EUR", 2_500, [700], True, [5, 5, 5, 5]))
    catch_up(database_url, settings)
    postings = [all_projections()["postings"]]
    assert verify(owner_database_url, postings, envelope_opener(settings)) == []
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("UPDATE ledger_postings SET amount_minor = amount_minor + 1"
                     " WHERE (position, line_no) = (SELECT min(position), 1 FROM ledger_postings)")
    found = verify(owner_database_url, postings, envelope_opener(settings))
    assert {(d.table, d.side) for d in found} == {("ledger_postings", "live only"), ("ledger_postings", "rebuild only")}
