"""The event store on real PostgreSQL: outbox atomicity, concurrency, encryption, migrations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from uuid import UUID

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError

from application.errors import ConcurrencyConflict
from application.ledger import Ledger
from domain.errors import InvalidTransition
from migrations import MigrationError, available, migrate
from tests.application.flows import PHONE, new_merchant, open_session, pay

REPO = Path(__file__).resolve().parents[2]


def counts(database_url: str) -> tuple[int, int, int]:
    """(events, outbox rows, events without an outbox row)"""
    with psycopg.connect(database_url) as conn:
        events = conn.execute("SELECT count(*) FROM ledger_events").fetchone()[0]
        outbox = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        orphans = conn.execute(
            "SELECT count(*) FROM ledger_events e LEFT JOIN outbox o ON o.position = e.notification_id"
            " WHERE o.outbox_id IS NULL"
        ).fetchone()[0]
    return events, outbox, orphans


def test_every_event_has_one_outbox_row_with_its_position(ledger: Ledger, database_url: str) -> None:
    payment_id = pay(ledger, open_session(ledger, new_merchant(ledger)))
    ledger.authorize_payment(payment_id)
    events, outbox, orphans = counts(database_url)
    assert events == outbox > 5 and orphans == 0
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT o.message_key, e.originator_id::text, o.topic FROM outbox o"
            " JOIN ledger_events e ON e.notification_id = o.position ORDER BY o.outbox_id"
        ).fetchall()
    assert all(key == originator for key, originator, _ in rows)
    assert {topic for *_, topic in rows} == {
        "echotransact.merchant.events", "echotransact.payment_session.events", "echotransact.payment.events"
    }


def test_an_outbox_row_cannot_exist_without_its_event(owner_database_url: str) -> None:
    # Not even for the tables' owner (the application may not insert outbox rows at all).
    with psycopg.connect(owner_database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            "INSERT INTO outbox (position, event_id, topic, message_key, envelope)"
            " VALUES (424242, gen_random_uuid(), 't', 'k', '\\x00')"
        )


def _slow_outbox_inserts(database_url: str) -> None:
    """Make the outbox insert stall, after the events are inserted in the same transaction
    (the same statement: ledger_append inserts events, then outbox rows)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE TRIGGER stall BEFORE INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION stall()"
        )


def _wait_for_stalled_backend(database_url: str, other_than: int = 0) -> int:
    deadline = time.monotonic() + 20
    with psycopg.connect(database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE '%%ledger_append%%'"
                " AND state = 'active' AND datname = current_database() AND pid <> %s",
                (other_than,),
            ).fetchone()
            if row:
                return int(row[0])
            time.sleep(0.05)
    raise AssertionError("the outbox insert never started")


def test_a_transaction_killed_between_events_and_outbox_leaves_neither(
    ledger: Ledger, database_url: str, owner_database_url: str
) -> None:
    merchant_id = new_merchant(ledger)
    before = counts(database_url)
    _slow_outbox_inserts(owner_database_url)
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            open_session(ledger, merchant_id, command_id="killed")
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=open_one)
    worker.start()
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        # The events of this transaction are inserted by now; the outbox insert is stalled.
        first = _wait_for_stalled_backend(owner_database_url)
        conn.execute("SELECT pg_terminate_backend(%s)", (first,))
        # The library retries a dropped connection: the retry stalls in the same place, and
        # while it does, nothing of the killed transaction is visible.
        second = _wait_for_stalled_backend(owner_database_url, other_than=first)
        assert counts(database_url) == before
        conn.execute("SELECT pg_terminate_backend(%s)", (second,))
        conn.execute("DROP TRIGGER stall ON outbox")
    worker.join(60)
    assert not errors
    # A later retry went through, and went through whole.
    events, outbox, orphans = counts(database_url)
    assert events == outbox == before[0] + 1 and orphans == 0
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM command_log WHERE command_id = 'killed'").fetchone() == (1,)


def test_a_process_killed_mid_transaction_leaves_neither(
    ledger: Ledger, database_url: str, owner_database_url: str, settings: object
) -> None:
    merchant_id = new_merchant(ledger)
    before = counts(database_url)
    _slow_outbox_inserts(owner_database_url)
    script = textwrap.dedent(
        f"""
        from api.bootstrap import build_ledger
        from api.settings import Settings
        from tests.application.flows import open_session
        from uuid import UUID
        ledger = build_ledger(Settings(hash_key=b"h" * 32, master_key=b"m" * 32, encryption_key=b"e" * 32),
                              {database_url!r})
        open_session(ledger, UUID({str(merchant_id)!r}), command_id="sigkilled")
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _wait_for_stalled_backend(owner_database_url)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        # The client is gone; the server rolls back once the stalled statement ends, which we
        # hurry along. Nothing of the transaction may be visible before, during or after.
        assert counts(database_url) == before
        conn.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE 'INSERT INTO outbox%%' AND datname = current_database()"
        )
        conn.execute("DROP TRIGGER stall ON outbox")
    assert counts(database_url) == before


def test_racing_commands_on_one_aggregate_exactly_one_wins(ledger: Ledger, database_url: str) -> None:
    payment_id = pay(ledger, open_session(ledger, new_merchant(ledger)))
    ledger.authorize_payment(payment_id)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def capture(i: int) -> None:
        barrier.wait()
        try:
            ledger.capture_payment(f"capture-{i}", payment_id)
            outcomes.append("captured")
        except InvalidTransition:
            outcomes.append("rejected")
        except ConcurrencyConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=capture, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("captured") == 1, outcomes
    with psycopg.connect(database_url) as conn:
        captured = conn.execute(
            "SELECT count(*) FROM outbox WHERE message_key = %s AND position = ("
            " SELECT max(notification_id) FROM ledger_events WHERE originator_id = %s)",
            (str(payment_id), payment_id),
        ).fetchone()
    assert captured == (1,)
    assert ledger.get_payment(payment_id).version == 5  # initiated, risk assessed, processing, authorized, captured


def test_two_saves_of_the_same_version_one_wins_at_the_store(ledger: Ledger) -> None:
    session_id = open_session(ledger, new_merchant(ledger))
    first, second = ledger.get_session(session_id), ledger.get_session(session_id)
    first.cancel("one", seal=ledger._seal_for_session(first))
    second.cancel("two", seal=ledger._seal_for_session(second))
    ledger.save(first)
    with pytest.raises(IntegrityError):
        ledger.save(second)
    assert ledger.cancel_reason(ledger.get_session(session_id)) == "one"


def test_identical_commands_in_parallel_run_once(ledger: Ledger, database_url: str) -> None:
    merchant_id = new_merchant(ledger)
    barrier = threading.Barrier(6)
    results: list[UUID] = []

    def open_same() -> None:
        barrier.wait()
        results.append(open_session(ledger, merchant_id, command_id="same"))

    threads = [threading.Thread(target=open_same) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 6
    events, outbox, _ = counts(database_url)
    assert events == outbox == 2


def test_raw_tables_hold_no_personal_data_in_plain_text(ledger: Ledger, database_url: str) -> None:
    payment_id = pay(ledger, open_session(ledger, new_merchant(ledger)))
    ledger.authorize_payment(payment_id)
    needles = [PHONE.encode(), PHONE[1:].encode(), b"Large pizza", b"ORDER-7"]
    with psycopg.connect(database_url) as conn:
        for table, column in [
            ("ledger_events", "state"), ("ledger_snapshots", "state"),
            ("outbox", "envelope"), ("command_log", "result::text::bytea"),
        ]:
            for (blob,) in conn.execute(f"SELECT {column} FROM {table}"):
                assert not any(n in bytes(blob) for n in needles), table
    # ...and the application still reads it all back.
    assert ledger.get_payment(payment_id).status == "authorized"


def test_unencrypted_configuration_would_show_the_order_but_not_the_phone(database_url: str, settings: object) -> None:
    """The previous test can fail: without a key the event state is plain JSON (the order reference
    shows); the phone is sealed under the customer's own key whatever the configuration."""
    from api.bootstrap import build_ledger
    from api.settings import Settings

    plain = build_ledger(Settings(hash_key=b"h" * 32, master_key=b"m" * 32), database_url)
    open_session(plain, new_merchant(plain))
    with psycopg.connect(database_url) as conn:
        blobs = [bytes(b) for (b,) in conn.execute("SELECT state FROM ledger_events")]
    assert any(b"ORDER-7" in b for b in blobs)
    assert not any(PHONE.encode() in b or PHONE[-10:].encode() in b for b in blobs)


def test_snapshots_are_taken_and_loading_is_unchanged(
    ledger: Ledger, database_url: str, owner_database_url: str
) -> None:
    merchant_id = new_merchant(ledger)
    for i in range(25):
        ledger.change_merchant_settings(f"rename-{i}", merchant_id, name=f"Luigi {i}")
    ledger.change_merchant_settings("fees", merchant_id, fee_percent_bps=250, fee_fixed_minor=20)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM ledger_snapshots").fetchone() == (0,)
    for i in range(25, 60):
        ledger.change_merchant_settings(f"rename-{i}", merchant_id, name=f"Luigi {i}")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM ledger_snapshots").fetchone()[0] >= 1
    merchant = ledger.get_merchant(merchant_id)
    assert merchant.name == "Luigi 59" and merchant.version == 62
    assert (merchant.fee_percent_bps, merchant.fee_fixed_minor) == (250, 20)
    # Loading from the events alone (no snapshot) gives the same aggregate.
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM ledger_snapshots")
    assert ledger.get_merchant(merchant_id).__dict__ == merchant.__dict__


def test_sessions_and_payments_load_from_their_events_without_reading_snapshots(
    ledger: Ledger, owner_database_url: str
) -> None:
    """Sessions and payments are not snapshotted, and loading one does not ask the snapshot
    table (one query, not two): a snapshot row an older version took of one is never read. Here
    the rows are unreadable; were they read, the load would fail."""
    session_id = open_session(ledger, new_merchant(ledger))
    payment_id = pay(ledger, session_id)
    session, payment = ledger.get_session(session_id), ledger.get_payment(payment_id)
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        for aggregate in (session, payment):
            conn.execute(
                "INSERT INTO ledger_snapshots (originator_id, originator_version, topic, state)"
                " VALUES (%s, %s, 'domain.payment_session:PaymentSession', 'not a snapshot')",
                (aggregate.id, aggregate.version),
            )
    assert ledger.get_session(session_id).__dict__ == session.__dict__
    assert ledger.get_payment(payment_id).__dict__ == payment.__dict__


def test_migrations_are_rerunnable_and_guard_against_edits(owner_database_url: str) -> None:
    assert migrate(owner_database_url) == []
    with psycopg.connect(owner_database_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate(owner_database_url)
    assert [m.version for m in available()] == sorted(m.version for m in available())


def test_a_pool_that_has_no_connection_to_lend_is_reported_after_one_wait_not_ten(database_url: str) -> None:
    """The library retries its OperationalError ten times; a PoolTimeout (the pool had no
    connection within its timeout) is passed on at once, so the API answers 503 promptly."""
    import time
    import uuid

    from psycopg_pool import PoolTimeout

    from adapters.postgres.connection import open_pool
    from api.bootstrap import build_ledger
    from api.settings import Settings

    pool = open_pool(database_url, max_size=1, max_idle_s=2.0, wait_s=0.3)
    ledger = build_ledger(Settings(hash_key=b"h" * 32, master_key=b"m" * 32), pool)
    try:
        with pool.connection():  # the only connection, taken
            started = time.monotonic()
            with pytest.raises(PoolTimeout):
                ledger.get_session(uuid.uuid4())
            assert time.monotonic() - started < 2.0
    finally:
        ledger.close()
        pool.close()


def test_a_pool_grown_under_load_is_back_to_one_connection_after_one_idle_period(database_url: str) -> None:
    """psycopg_pool alone closes one idle connection per max_idle period (a pool grown to 9
    still held 4 after 10 s at rest); ours closes every connection that stayed unused through a
    period. The periods are driven by hand here (max_idle is long enough never to fire)."""
    import contextlib

    from adapters.postgres.connection import open_pool

    pool = open_pool(database_url, max_size=6, max_idle_s=600, wait_s=5)
    try:
        with contextlib.ExitStack() as held:
            for _ in range(6):
                held.enter_context(pool.connection())
        assert pool.get_stats()["pool_available"] == 6  # each is back as its ``with`` ends
        pool._shrink_pool()  # ends the period of the load (it may close one) and starts a quiet one
        pool._shrink_pool()  # ends a period in which none was used
        assert pool.get_stats()["pool_size"] == 1
    finally:
        pool.close()


def test_a_returned_connection_is_back_in_the_pool_at_once_reset_and_out_of_any_transaction(database_url: str) -> None:
    """The returning thread puts a connection back itself (no hand-off to the pool's worker
    threads): it is available the moment its ``with`` ends, with tuple rows and the read-write,
    default-isolation session a borrower may have changed, and one left inside a transaction is
    rolled back, not lent on with it."""
    import psycopg
    from psycopg.rows import dict_row

    from adapters.postgres.connection import open_pool

    pool = open_pool(database_url, max_size=1, max_idle_s=600, wait_s=5)  # one: the same one each time
    try:
        with pool.connection() as conn:
            conn.row_factory = dict_row  # type: ignore[assignment]
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            lent = conn
        assert pool.get_stats()["pool_available"] == 1  # no waiting for a worker thread
        with pool.connection() as conn:
            assert conn is lent
            assert conn.execute("SELECT 1").fetchone() == (1,)  # tuple rows again
            assert conn.execute("SHOW transaction_read_only").fetchone() == ("off",)
            assert conn.read_only is None and conn.isolation_level is None
        conn = pool.getconn()  # given back by hand: the ``with`` above commits what is open
        conn.autocommit = False
        conn.execute("CREATE TEMP TABLE left_open (n int)")  # a transaction left open
        pool.putconn(conn)
        assert pool.get_stats()["pool_available"] == 1
        with pool.connection() as conn:
            assert conn is lent and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert conn.autocommit
            # rolled back: the table created in the open transaction does not exist
            assert conn.execute("SELECT to_regclass('pg_temp.left_open')").fetchone() == (None,)
    finally:
        pool.close()
