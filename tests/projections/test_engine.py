"""Projections applied from the outbox feed on real PostgreSQL: expectations, exactly-once,
gap filling, rebuild equality and audit tampering. (Kafka and Faust are in test_worker.py.)"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest

from api.bootstrap import envelope_opener, personal_data_reader
from api.settings import Settings
from application.envelope import EventEnvelope
from application.ledger import Ledger
from projections.audit import verify_chain
from projections.engine import Projection, ProjectionStore
from projections.registry import all_projections, select
from projections.replay import rebuild, verify
from tests.application.flows import new_merchant, open_session, pay


def feed(database_url: str, settings: Settings) -> list[EventEnvelope]:
    """Every envelope in the outbox, with its position, independently of the engine."""
    open_envelope = envelope_opener(settings)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT position, envelope FROM outbox ORDER BY position").fetchall()
    out = []
    for position, payload in rows:
        e = open_envelope(payload)
        out.append(EventEnvelope(**{**{f: getattr(e, f) for f in e.__struct_fields__}, "position": position}))
    return out


def outbox_position(e: EventEnvelope) -> int:
    """The outbox position feed() gave the envelope."""
    assert e.position is not None
    return e.position


def scenario(ledger: Ledger) -> dict[str, UUID]:
    """Two merchants; paid+captured+refunded, declined-then-paid, cancelled, locked, expired."""
    m1, m2 = new_merchant(ledger, "m1"), new_merchant(ledger, "m2")
    s1 = open_session(ledger, m1, "s1", amount_minor=2_500)
    p1 = pay(ledger, s1, prefix="s1-")
    ledger.authorize_payment(p1)
    ledger.capture_payment("cap1", p1)
    ledger.refund_payment("ref1", p1, amount_minor=500)

    s2 = open_session(ledger, m1, "s2", amount_minor=4_000)
    declined = pay(ledger, s2, last4="0002", prefix="s2-")
    ledger.authorize_payment(declined)
    p2 = UUID(ledger.attach_payment_method("s2-again", s2, card_token="t", card_brand="visa",
                                           card_last4="4242").result["payment_id"])
    ledger.authorize_payment(p2)
    ledger.capture_payment("cap2", p2, amount_minor=3_000)

    s3 = open_session(ledger, m2, "s3", amount_minor=1_000)
    ledger.cancel_session("c3", s3)
    s4 = open_session(ledger, m2, "s4", amount_minor=1_000)
    link = ledger.send_link("s4-send", s4)
    wrong = "000000" if link.code != "000000" else "111111"
    for i in range(5):
        ledger.verify_code(f"s4-guess-{i}", s4, wrong)
    s5 = open_session(ledger, m2, "s5", amount_minor=1_000)
    ledger.send_link("s5-send", s5)
    ledger.clock.advance(timedelta(minutes=16))  # type: ignore[attr-defined]
    ledger.expire_session(s5)
    return {"m1": m1, "m2": m2, "p1": p1, "p2": p2, "declined": declined,
            "s1": s1, "s2": s2, "s3": s3, "s4": s4, "s5": s5}


@pytest.fixture
def store(database_url: str, settings: Settings) -> Iterator[ProjectionStore]:
    s = ProjectionStore(database_url, _all(settings), envelope_opener(settings))
    yield s
    s.close()


def _all(settings: Settings) -> list[Projection]:
    """Every projection, opening sealed personal data with the customers' keys (as the worker does)."""
    return list(all_projections(personal_data_reader(settings)).values())


def rows(database_url: str, query: str, *params: object) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query, params).fetchall()


def test_read_models_match_expectations(
    ledger: Ledger, store: ProjectionStore, database_url: str, settings: Settings
) -> None:
    ids = scenario(ledger)
    store.catch_up(grace=timedelta(0))

    statuses = dict(rows(database_url, "SELECT session_id, status FROM session_status"))
    assert statuses == {ids["s1"]: "completed", ids["s2"]: "completed", ids["s3"]: "cancelled",
                        ids["s4"]: "locked", ids["s5"]: "expired"}
    assert rows(database_url, "SELECT customer_phone_masked FROM session_status LIMIT 1") == [("+1******0123",)]
    payments = {r[0]: r[1:] for r in rows(database_url,
        "SELECT payment_id, status, captured_minor, fee_minor, refunded_minor, failure_code FROM payment_status")}
    assert payments[ids["p1"]] == ("captured", 2_500, 103, 500, None)
    assert payments[ids["p2"]] == ("captured", 3_000, 117, 0, None)  # 87 + 30
    assert payments[ids["declined"]] == ("failed", 0, 0, 0, "insufficient_funds")

    funnel = {r[0]: r[1:] for r in rows(database_url,
        "SELECT merchant_id, opened, link_sent, link_opened, code_verified, paid, cancelled, locked, expired"
        " FROM funnel_daily")}
    assert funnel[ids["m1"]] == (2, 2, 2, 2, 2, 0, 0, 0)
    assert funnel[ids["m2"]] == (3, 2, 0, 0, 0, 1, 1, 1)
    volume = rows(database_url,
        "SELECT authorized_count, declined_count, captured_count, gross_captured_minor, refunded_minor, fees_minor"
        " FROM volume_daily WHERE merchant_id = %s", ids["m1"])
    assert volume == [(2, 1, 2, 5_500, 500, 220)]
    # Every payment was scored before authorization; analytics count the verdicts.
    risk = rows(database_url, "SELECT risk_approved_count, risk_review_count, risk_declined_count,"
                " risk_score_total FROM volume_daily WHERE merchant_id = %s", ids["m1"])
    scores = rows(database_url, "SELECT risk_decision, risk_score FROM payment_status WHERE merchant_id = %s",
                  ids["m1"])
    assert {d for d, _ in scores} == {"approve"} and len(scores) == 3
    assert risk == [(3, 0, 0, sum(score for _, score in scores))]

    # Balances: independently, from the postings in the feed.
    expected: Counter[tuple[str, str]] = Counter()
    for e in feed(database_url, settings):
        for p in e.data.get("postings", []):
            expected[(p["account"], p["currency"])] += p["amount_minor"] * (1 if p["direction"] == "debit" else -1)
    found = rows(database_url, "SELECT account, currency, balance_minor FROM ledger_balances")
    balances = {(a, c): b for a, c, b in found}
    assert balances == dict(expected)
    assert sum(balances.values()) == 0
    assert balances[(f"merchant:{ids['m1']}:payable", "USD")] == -(5_500 - 220 - 500)

    audit = rows(database_url, "SELECT count(*), count(hash) FROM audit_log")[0]
    events = rows(database_url, "SELECT count(*) FROM ledger_events")[0][0]
    assert audit == (events, events)
    assert verify_chain(psycopg.connect(database_url)).ok
    dump = str(rows(database_url, "SELECT data FROM audit_log"))
    # The audit trail holds no phone, not even masked: only the customer's pseudonym and the
    # phone sealed under their key (erasure destroys the key, the chain stays as it is).
    assert "4155550123" not in dump and "******" not in dump and "'customer_id'" in dump
    assert "'sealed'" in dump


def test_duplicates_reordering_and_gaps_are_applied_exactly_once(
    ledger: Ledger, store: ProjectionStore, database_url: str, owner_database_url: str, settings: Settings
) -> None:
    scenario(ledger)
    envelopes = feed(database_url, settings)
    shuffled = envelopes * 2
    random.Random(7).shuffle(shuffled)
    # Some events never arrive on their own: their later versions must pull them in.
    dropped = set(random.Random(8).sample(range(len(envelopes)), len(envelopes) // 4))
    arriving = [e for e in shuffled if (outbox_position(e) - outbox_position(envelopes[0])) not in dropped]
    for start in range(0, len(arriving), 7):
        store.apply_batch(arriving[start:start + 7])
    store.catch_up(grace=timedelta(0))  # anything whose later versions never came either
    # Replay and verify are the tables' owner's (a scratch schema, TRUNCATE); the store is the application's.
    assert verify(owner_database_url, _all(settings), envelope_opener(settings)) == []
    assert verify_chain(psycopg.connect(database_url)).ok


def test_each_projection_keeps_the_newest_position_it_applied_which_never_goes_back(
    ledger: Ledger, store: ProjectionStore, database_url: str, settings: Settings
) -> None:
    """Readiness, metrics and the console read how far each projection is from its checkpoint
    row: every batch moves it to the newest position applied, a batch of older events (or of
    duplicates) leaves it, and a projection that applied nothing has none."""
    ids = scenario(ledger)
    envelopes = feed(database_url, settings)

    def applied() -> dict[str, int]:
        return dict(rows(database_url, "SELECT projection, applied_position FROM projection_checkpoints"))

    s3 = [e for e in envelopes if e.aggregate_id == ids["s3"]]
    lagging = store.projections[0]
    others = ProjectionStore(database_url, [p for p in store.projections if p is not lagging], store.open_envelope)
    try:
        others.apply_batch(s3)
    finally:
        others.close()
    newest_of_s3 = max(map(outbox_position, s3))
    assert applied() == {p.name: newest_of_s3 for p in store.projections if p is not lagging}

    store.apply_batch(envelopes[-3:])  # later versions pull in their aggregates' earlier ones
    newest = outbox_position(envelopes[-1])
    assert applied() == {p.name: newest for p in store.projections}
    store.apply_batch(envelopes[:5])  # older aggregates, all applied for the first time
    store.apply_batch(s3)  # duplicates for every projection but the lagging one, which applies them
    assert applied() == {p.name: newest for p in store.projections}


def test_a_catch_up_opens_only_the_rows_some_projection_has_not_applied(
    ledger: Ledger, store: ProjectionStore, database_url: str, owner_database_url: str, settings: Settings
) -> None:
    """What Kafka brought, the catch-up passes over without opening (decrypting) it; what it did
    not bring, the catch-up applies: the last events of two aggregates, which no later version
    pulls in, and one event applied by all projections but one."""
    ids = scenario(ledger)
    envelopes = feed(database_url, settings)
    last_of = {e.aggregate_id: outbox_position(e) for e in envelopes}
    missing = {last_of[ids["p1"]], last_of[ids["s5"]]}
    one_behind = last_of[ids["s3"]]
    store.apply_batch([e for e in envelopes if outbox_position(e) not in missing | {one_behind}])
    lagging = store.projections[0]
    others = ProjectionStore(database_url, [p for p in store.projections if p is not lagging], store.open_envelope)
    try:
        others.apply_batch([e for e in envelopes if outbox_position(e) == one_behind])
    finally:
        others.close()
    opened: list[int] = []
    open_envelope = envelope_opener(settings)

    def counting(payload: bytes) -> EventEnvelope:
        opened.append(1)
        return open_envelope(payload)

    catching_up = ProjectionStore(database_url, store.projections, counting)
    try:
        applied = catching_up.catch_up(grace=timedelta(0))
    finally:
        catching_up.close()
    assert len(opened) == len(missing) + 1  # the two never applied and the one a projection lacks
    assert applied == len(missing) * len(store.projections) + 1
    assert catching_up.checkpoint("status") == outbox_position(envelopes[-1])
    assert verify(owner_database_url, _all(settings), envelope_opener(settings)) == []


@pytest.fixture
def caught_up(ledger: Ledger, store: ProjectionStore) -> dict[str, UUID]:
    """The scenario's ids, every event of it applied by every projection."""
    ids = scenario(ledger)
    store.catch_up(grace=timedelta(0))
    return ids


def test_verify_lists_differences_and_replay_repairs_them(
    caught_up: dict[str, UUID], database_url: str, owner_database_url: str, settings: Settings
) -> None:
    ids = caught_up
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE payment_status SET captured_minor = 1 WHERE payment_id = %s", (ids["p1"],))
    differences = verify(owner_database_url, select("status", personal_data_reader(settings)),
                         envelope_opener(settings))
    assert {(d.table, d.side) for d in differences} == {
        ("payment_status", "live only"), ("payment_status", "rebuild only")
    }
    rebuild(owner_database_url, select("all", personal_data_reader(settings)), envelope_opener(settings))
    assert verify(owner_database_url, select("all", personal_data_reader(settings)), envelope_opener(settings)) == []


def test_verify_names_a_projection_s_wrong_version_and_only_the_projections_it_checks(
    caught_up: dict[str, UUID], owner_database_url: str, settings: Settings
) -> None:
    ids = caught_up
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("UPDATE projection_versions SET applied = jsonb_set(applied, '{status,0}', '1')"
                     " WHERE aggregate_id = %s", (ids["s4"],))
        conn.execute("UPDATE projection_versions SET applied = applied - 'audit' WHERE aggregate_id = %s",
                     (ids["s3"],))
    opener = envelope_opener(settings)
    differences = verify(owner_database_url, select("status", personal_data_reader(settings)), opener)
    assert [(d.table, d.side, d.row["aggregate_id"], list(d.row["applied"])) for d in differences] == [
        ("projection_versions", "live only", ids["s4"], ["status"]),
        ("projection_versions", "rebuild only", ids["s4"], ["status"]),
    ]
    assert differences[0].row["applied"]["status"][0] == 1
    assert {(d.table, d.side, d.row["aggregate_id"]) for d in verify(owner_database_url, select("audit"), opener)
            } == {("projection_versions", "rebuild only", ids["s3"])}


def test_rebuilding_one_projection_keeps_the_others_versions_and_rebuilding_all_empties_them_first(
    caught_up: dict[str, UUID], database_url: str, owner_database_url: str, settings: Settings
) -> None:
    def others() -> list[tuple]:
        return rows(database_url, "SELECT aggregate_id, applied - 'status' FROM projection_versions ORDER BY 1")

    before = others()
    assert len(before) >= 10 and all(applied for _, applied in before)
    opener = envelope_opener(settings)
    rebuild(owner_database_url, select("status", personal_data_reader(settings)), opener)
    assert others() == before
    assert verify(owner_database_url, _all(settings), opener) == []
    with psycopg.connect(owner_database_url, autocommit=True) as conn:  # an entry rebuilding all must drop
        conn.execute("UPDATE projection_versions SET applied = applied || '{\"status\": [99, 99]}'"
                     " WHERE aggregate_id = %s", (caught_up["s1"],))
    rebuild(owner_database_url, _all(settings), opener)
    assert others() == before
    assert verify(owner_database_url, _all(settings), opener) == []


def test_tampering_with_one_audit_row_is_named(
    ledger: Ledger, store: ProjectionStore, owner_database_url: str
) -> None:
    scenario(ledger)
    store.catch_up(grace=timedelta(0))
    with psycopg.connect(owner_database_url, autocommit=True) as conn:  # the application may not
        victim = conn.execute("SELECT position FROM audit_log ORDER BY position OFFSET 10 LIMIT 1").fetchone()[0]
        conn.execute(
            "UPDATE audit_log SET data = jsonb_set(data, '{amount_minor}', '1') WHERE position = %s", (victim,)
        )
        report = verify_chain(conn)
    assert not report.ok and report.first_broken_position == victim


def test_unknown_projection_names_are_rejected_readably() -> None:
    with pytest.raises(ValueError, match="choose from: all, status"):
        select("statuz")


def test_read_your_writes_waits_for_the_commands_position(
    ledger: Ledger, store: ProjectionStore, database_url: str
) -> None:
    import threading

    from projections.queries import StatusQueries
    from projections.views import ReadViews, Scope

    merchant_id = new_merchant(ledger)
    session_id = open_session(ledger, merchant_id)
    store.catch_up(grace=timedelta(0))
    result = ledger.cancel_session("cancel", session_id)
    views = ReadViews(database_url)
    queries = StatusQueries(views)
    mine = Scope("merchant", merchant_id)
    row, reached = queries.get("session", session_id, scope=mine, wait_for_position=result.position, timeout_s=0.2)
    assert row is not None and row["status"] == "awaiting_customer" and not reached
    threading.Timer(0.3, lambda: ProjectionStore(
        database_url, store.projections, store.open_envelope).catch_up(grace=timedelta(0))).start()
    row, reached = queries.get("session", session_id, scope=mine, wait_for_position=result.position, timeout_s=5)
    assert reached and row is not None and row["status"] == "cancelled"
    assert queries.get("session", session_id, scope=Scope("merchant", UUID(int=5))) == (None, True)
    views.close()


def test_with_redis_unreachable_a_status_read_comes_from_the_read_model(
    ledger: Ledger, store: ProjectionStore, database_url: str
) -> None:
    """The status cache is a hint: Redis down (a restart) is a miss, never an error."""
    import redis

    from projections.queries import StatusQueries
    from projections.status_cache import StatusCache
    from projections.views import ReadViews, Scope

    merchant_id = new_merchant(ledger)
    session_id = open_session(ledger, merchant_id)
    store.catch_up(grace=timedelta(0))
    gone = redis.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.2, socket_timeout=0.2)
    with ReadViews(database_url) as views:
        row, reached = StatusQueries(views, cache=StatusCache(gone)).get(
            "session", session_id, scope=Scope("merchant", merchant_id))
    assert reached and row is not None and row["status"] == "awaiting_customer"


def test_the_migration_to_a_row_per_aggregate_keeps_every_projection_s_version(
    owner_database_url: str, database_url: str
) -> None:
    """migrations/0030: rows of the earlier shape (one per projection and aggregate) become one
    row per aggregate holding each projection's version and position, still the application's
    to read and write."""
    from migrations import migrate

    a, b = UUID(int=1), UUID(int=2)
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("DROP TABLE projection_versions")
        conn.execute("CREATE TABLE projection_versions (projection text NOT NULL, aggregate_id uuid NOT NULL,"
                     " version bigint NOT NULL, position bigint NOT NULL, PRIMARY KEY (projection, aggregate_id))")
        conn.execute("INSERT INTO projection_versions VALUES ('status', %s, 3, 30), ('audit', %s, 2, 20),"
                     " ('status', %s, 1, 5)", (a, a, b))
        conn.execute("DELETE FROM schema_migrations WHERE version = 30")
        assert [m.version for m in migrate(owner_database_url)] == [30]
    assert rows(database_url, "SELECT aggregate_id, applied FROM projection_versions ORDER BY aggregate_id") == [
        (a, {"status": [3, 30], "audit": [2, 20]}), (b, {"status": [1, 5]}),
    ]
    with psycopg.connect(database_url) as conn:  # the application's role
        conn.execute("UPDATE projection_versions SET applied = applied || '{\"audit\": [1, 5]}'"
                     " WHERE aggregate_id = %s", (b,))
        conn.execute("INSERT INTO projection_versions VALUES (%s, '{}')", (UUID(int=3),))


def test_two_stores_applying_the_same_new_aggregate_at_once_one_fails_retryably_and_its_retry_is_a_no_op(
    ledger: Ledger, database_url: str, owner_database_url: str, settings: Settings
) -> None:
    """The second writer of a new aggregate has no row to lock: its insert waits for the first
    writer's commit, then fails with a unique violation (raised by apply_batch, in a pipeline as
    without: the worker retries on it), and the retry finds the events applied."""
    import threading

    from projections.worker import RETRYABLE

    open_session(ledger, new_merchant(ledger, "m"), "s")
    envelopes = feed(database_url, settings)
    inside, release = threading.Event(), threading.Event()

    def hold(_conn: psycopg.Connection[Any], _ids: object) -> None:
        inside.set()
        assert release.wait(30)

    first = ProjectionStore(database_url, _all(settings), envelope_opener(settings), on_batch=hold)
    second = ProjectionStore(database_url, _all(settings), envelope_opener(settings))
    failures: list[BaseException] = []
    try:
        holder = threading.Thread(target=first.apply_batch, args=(envelopes,))
        holder.start()
        assert inside.wait(30)

        def race() -> None:
            try:
                second.apply_batch(envelopes)
            except BaseException as error:
                failures.append(error)

        racer = threading.Thread(target=race)
        racer.start()
        racer.join(1.0)
        assert racer.is_alive()  # waiting for the first writer's uncommitted rows
        release.set()
        holder.join(30)
        racer.join(30)
        assert len(failures) == 1 and isinstance(failures[0], RETRYABLE), failures
        again = second.apply_batch(envelopes)
        assert (again.applied, again.duplicates) == (0, len(envelopes) * len(second.projections))
    finally:
        release.set()
        first.close()
        second.close()
    assert verify(owner_database_url, _all(settings), envelope_opener(settings)) == []
