"""The set-based engine against the row-at-a-time one it replaced (tests/projections/row_at_a_time.py),
on real PostgreSQL: the same arrivals (shuffled, repeated, some lost, in batches of any size) give
the same rows in every read model, the same versions and the same audit hashes."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from api.bootstrap import envelope_opener, personal_data_reader
from api.settings import Settings
from application.envelope import EventEnvelope
from application.ledger import Ledger
from projections.audit import stored_json, verify_chain
from projections.engine import ProjectionStore, fresh_versions, gaps
from projections.registry import all_projections
from tests.application.flows import new_merchant, open_session, pay
from tests.projections import row_at_a_time
from tests.projections.test_engine import feed, scenario

BOOKKEEPING = ("projection_versions", "projection_checkpoints")
# The projections the row-at-a-time engine had; later ones (reconciliations, payouts) have their
# own tests. Columns added since to its tables are left out of the comparison.
FROZEN = ("status", "analytics", "audit", "balances")
TABLES = tuple(t for name in FROZEN for t in all_projections()[name].tables)
LATER_COLUMNS = {"payment_status": ("settled_at", "payout_due_minor", "payout_currency", "card_fingerprint_hash")}


def frozen_projections(settings: Settings) -> list[Any]:
    return [all_projections(personal_data_reader(settings))[name] for name in FROZEN]


def more_events(ledger: Ledger) -> None:
    """Beyond the scenario: text COPY must escape, several refunds, a settlement, a decline."""
    merchant = new_merchant(ledger, "m3")
    session = open_session(ledger, merchant, "s6", amount_minor=3_000, metadata={
        "tab": "a\tb", "newline": "a\nb", "backslash": "a\\b\\\\N", "quote": 'say "hi"', "unicode": "ü€😀",
        "looks_like_a_float": "1e16", "cr": "a\rb",
    })
    payment = pay(ledger, session, prefix="s6-")
    ledger.authorize_payment(payment)
    ledger.capture_payment("cap6", payment)
    ledger.refund_payment("ref6a", payment, amount_minor=1_000)
    ledger.refund_payment("ref6b", payment, amount_minor=2_000)
    s7 = open_session(ledger, merchant, "s7", amount_minor=1_500)
    declined = pay(ledger, s7, last4="0002", prefix="s7-")
    ledger.authorize_payment(declined)


@pytest.fixture
def events(ledger: Ledger, database_url: str, settings: Settings) -> list[EventEnvelope]:
    scenario(ledger)
    more_events(ledger)
    return feed(database_url, settings)


class Scratch:
    """Read-model tables of their own in a schema, so two engines can be compared side by side."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.schema = f"cmp_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
            for table in (*TABLES, *BOOKKEEPING):
                conn.execute(sql.SQL("CREATE TABLE {}.{} (LIKE public.{} INCLUDING ALL)").format(
                    sql.Identifier(self.schema), sql.Identifier(table), sql.Identifier(table)))

    def connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.database_url, autocommit=True)
        conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(self.schema)))
        return conn

    def truncate(self) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(
                sql.Identifier(self.schema, t) for t in (*TABLES, *BOOKKEEPING))))


def differences(database_url: str, left: str, right: str) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    with psycopg.connect(database_url) as conn:
        for table in (*TABLES, "projection_versions"):
            def rows_of(schema: str, table: str = table) -> sql.Composable:
                if table == "projection_versions":  # one row per projection and aggregate
                    return sql.SQL("SELECT v.aggregate_id, a.key, a.value FROM {}.projection_versions v"
                                   " CROSS JOIN jsonb_each(v.applied) AS a WHERE a.key = ANY({})").format(
                        sql.Identifier(schema), sql.Literal(list(FROZEN)))
                names = [n for (n,) in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public'"
                    " AND table_name = %s ORDER BY ordinal_position", (table,))
                    if n not in LATER_COLUMNS.get(table, ())]
                return sql.SQL("SELECT {} FROM {}.{}").format(
                    sql.SQL(", ").join(map(sql.Identifier, names)), sql.Identifier(schema), sql.Identifier(table))
            query = sql.SQL("({l} EXCEPT ALL {r}) UNION ALL ({r} EXCEPT ALL {l})").format(
                l=rows_of(left), r=rows_of(right))
            rows = conn.execute(query).fetchall()
            if rows:
                out[table] = rows
    return out


@pytest.fixture
def pair(owner_database_url: str) -> Iterator[tuple[Scratch, Scratch]]:
    """Scratch schemas are made (and read) by the tables' owner, like replay --verify's."""
    yield Scratch(owner_database_url), Scratch(owner_database_url)


def apply_both(
    old: Scratch, new: Scratch, settings: Settings, batches: list[list[EventEnvelope]]
) -> None:
    open_envelope = envelope_opener(settings)
    with old.connect() as conn:
        conn.autocommit = False
        for batch in batches:
            row_at_a_time.apply_batch(conn, open_envelope, batch, personal_data_reader(settings))
    store = ProjectionStore(old.database_url, frozen_projections(settings), open_envelope, schema=new.schema)
    try:
        for batch in batches:
            store.apply_batch(batch)
    finally:
        store.close()


def arrivals(events: list[EventEnvelope], rng: random.Random, *, repeat: int, lost: float,
             batch_max: int) -> list[list[EventEnvelope]]:
    shuffled = events * repeat
    rng.shuffle(shuffled)
    dropped = {e.position for e in events if rng.random() < lost}
    arriving = [e for e in shuffled if e.position not in dropped]
    batches, start = [], 0
    while start < len(arriving):
        size = rng.randint(1, batch_max)
        batches.append(arriving[start:start + size])
        start += size
    return batches


@pytest.mark.parametrize(("repeat", "lost", "batch_max"), [
    (1, 0.0, 1),      # one at a time, in position order once sorted per batch
    (1, 0.0, 10_000),  # everything in one batch
    (2, 0.0, 7),      # every event twice, shuffled
    (2, 0.3, 13),     # and some lost: later versions pull them from the outbox
    (3, 0.5, 50),
])
def test_set_based_equals_row_at_a_time(
    events: list[EventEnvelope], pair: tuple[Scratch, Scratch], settings: Settings, owner_database_url: str,
    repeat: int, lost: float, batch_max: int,
) -> None:
    old, new = pair
    batches = arrivals(events, random.Random(repeat * 100 + batch_max), repeat=repeat, lost=lost,
                       batch_max=batch_max)
    if batch_max == 1:
        batches = [[e] for e in sorted(events, key=lambda e: e.position or 0)]
    apply_both(old, new, settings, batches)
    assert differences(owner_database_url, old.schema, new.schema) == {}
    with new.connect() as conn:
        assert verify_chain(conn).ok
        counts = conn.execute("SELECT count(*), count(hash) FROM audit_log").fetchone()
    if lost == 0:
        assert counts == (len(events), len(events))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), repeat=st.integers(1, 3), lost=st.sampled_from([0.0, 0.1, 0.5]),
       batch_max=st.integers(1, 40))
def test_any_arrival_order_and_batching_gives_the_same_rows(
    events: list[EventEnvelope], pair: tuple[Scratch, Scratch], settings: Settings, owner_database_url: str,
    seed: int, repeat: int, lost: float, batch_max: int,
) -> None:
    old, new = pair
    old.truncate()
    new.truncate()
    apply_both(old, new, settings, arrivals(events, random.Random(seed), repeat=repeat, lost=lost,
                                            batch_max=batch_max))
    assert differences(owner_database_url, old.schema, new.schema) == {}


def test_catch_up_and_rebuild_equal_a_row_at_a_time_build(
    events: list[EventEnvelope], pair: tuple[Scratch, Scratch], settings: Settings, owner_database_url: str,
) -> None:
    old, new = pair
    with old.connect() as conn:
        conn.autocommit = False
        row_at_a_time.apply_batch(conn, envelope_opener(settings), events, personal_data_reader(settings))
    store = ProjectionStore(owner_database_url, frozen_projections(settings), envelope_opener(settings),
                            schema=new.schema)
    try:
        half = len(events) // 2
        store.apply_batch(events[:half])
        assert store.catch_up(grace=timedelta(0), batch_size=9) == (len(events) - half) * 4
        assert store.catch_up(grace=timedelta(0)) == 0  # a second run finds nothing
        assert differences(owner_database_url, old.schema, new.schema) == {}
        assert store.rebuild() == len(events) * 4
        assert differences(owner_database_url, old.schema, new.schema) == {}
    finally:
        store.close()


def test_a_batch_counts_duplicates_and_gaps_as_before(events: list[EventEnvelope]) -> None:
    first = next(e for e in events if e.version == 1 and sum(x.aggregate_id == e.aggregate_id for x in events) >= 3)
    later = sorted((e for e in events if e.aggregate_id == first.aggregate_id), key=lambda e: e.version)
    fresh, duplicates = fresh_versions([later[0], later[0], later[2]], {first.aggregate_id: 0})
    assert duplicates == 1 and sorted(fresh[first.aggregate_id]) == [1, 3]
    assert gaps(fresh, {}) == {first.aggregate_id: (0, 3)}
    fresh, duplicates = fresh_versions([later[0], later[2]], {first.aggregate_id: 1})
    assert duplicates == 1 and gaps(fresh, {first.aggregate_id: 1}) == {first.aggregate_id: (1, 3)}
    fresh, duplicates = fresh_versions([later[1], later[2]], {first.aggregate_id: 1})
    assert duplicates == 0 and gaps(fresh, {first.aggregate_id: 1}) == {}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text().filter(lambda s: "\x00" not in s),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8).filter(lambda s: "\x00" not in s), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON)
def test_stored_json_is_what_jsonb_gives_back(database_url: str, value: Any) -> None:
    """The audit hash is computed before the insert over stored_json(data): it must be what the
    verifier later reads back from the jsonb column."""
    with psycopg.connect(database_url) as conn:
        back = conn.execute("SELECT %s::text::jsonb", (msgspec.json.encode(value).decode(),)).fetchone()[0]
    expected = msgspec.json.Encoder(order="sorted").encode(back)
    assert msgspec.json.Encoder(order="sorted").encode(stored_json(value)) == expected
