"""Data retention on real PostgreSQL: per rule, old rows go and young or still-needed rows stay;
a second run deletes nothing; batches larger than the limit are purged across batches and runs;
the outbox is never touched and only vaulted cards never attached to a payment go. Times are
the database's (rows are written relative to its now())."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from adapters.notifications.sms import DevSmsSender
from adapters.notifications.webhooks import WebhookPlanner
from adapters.postgres import retention
from adapters.postgres.retention import TABLES, RetentionPolicy, parse_policy, purge, run_retention
from adapters.postgres.vault import CardVault
from api.bootstrap import envelope_opener, personal_data_reader
from api.settings import Settings
from application.ledger import Ledger
from domain.errors import InvalidPaymentMethod
from projections.engine import ProjectionStore
from projections.registry import all_projections
from projections.replay import verify
from tests.application.flows import new_merchant, open_session, pay

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
NOTHING = dict.fromkeys(TABLES, 0)


@pytest.fixture
def conn(owner_database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """The tables' owner, who ages rows at will; purges run as the application (database_url)."""
    with psycopg.connect(owner_database_url, autocommit=True) as connection:
        yield connection


def only(**counts: int) -> dict[str, int]:
    """The result of a purge that deleted just these."""
    return {**NOTHING, **counts}


def column(conn: psycopg.Connection[Any], query: str, *params: Any) -> list[Any]:
    return [row[0] for row in conn.execute(query, params)]


# -- idempotency records ------------------------------------------------------------------------


def add_key(conn: psycopg.Connection[Any], key: str, *, created_ago: timedelta, expires_ago: timedelta,
            state: str = "completed", locked_for: timedelta = -DAY * 3) -> None:
    conn.execute(
        "INSERT INTO idempotency_records (scope, idempotency_key, request_hash, state, response_status,"
        " response_body, locked_until, created_at, expires_at)"
        " VALUES ('merchant-1', %s, 'h', %s, 201, '{}', now() + %s, now() - %s, now() - %s)",
        (key, state, locked_for, created_ago, expires_ago),
    )


def test_idempotency_records_go_a_day_after_they_expired(conn: psycopg.Connection[Any], database_url: str) -> None:
    add_key(conn, "long-expired", created_ago=3 * DAY, expires_ago=2 * DAY)
    add_key(conn, "just-expired", created_ago=DAY + HOUR, expires_ago=HOUR)  # grace: kept
    add_key(conn, "live", created_ago=HOUR, expires_ago=-23 * HOUR)  # inside the replay window
    # A claim still locked (a request running right now) stays, however old its expiry says it is.
    add_key(conn, "claimed", created_ago=3 * DAY, expires_ago=2 * DAY, state="in_progress", locked_for=HOUR)

    assert purge(database_url) == only(idempotency_records=1)
    assert sorted(column(conn, "SELECT idempotency_key FROM idempotency_records")) == [
        "claimed", "just-expired", "live"]
    assert purge(database_url) == NOTHING


# -- SMS ------------------------------------------------------------------------------------------


def add_message(conn: psycopg.Connection[Any], state: str, age: timedelta) -> uuid.UUID:
    message_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO outbox_messages (message_id, kind, aggregate_id, payload, state, attempts,"
        " next_attempt_at, created_at, sent_at)"
        " VALUES (%s, 'sms', %s, '\\x00', %s, 1, now() - %s, now() - %s,"
        " CASE WHEN %s = 'sent' THEN now() - %s END)",
        (message_id, uuid.uuid4(), state, age, age, state, age),
    )
    return message_id


def test_sent_and_failed_sms_go_after_30_days_pending_ones_never(
    ledger: Ledger, conn: psycopg.Connection[Any], database_url: str
) -> None:
    # One real message, as the ledger queues it, sent 31 days ago.
    session_id = open_session(ledger, new_merchant(ledger))
    ledger.send_link("send", session_id)
    (real,) = column(conn, "SELECT message_id FROM outbox_messages")
    conn.execute("UPDATE outbox_messages SET state = 'sent', sent_at = now() - %(age)s,"
                 " created_at = now() - %(age)s, next_attempt_at = now() - %(age)s", {"age": 31 * DAY})
    old_failed = add_message(conn, "failed", 31 * DAY)
    old_pending = add_message(conn, "pending", 90 * DAY)  # still to be sent: never deleted
    young_sent = add_message(conn, "sent", 29 * DAY)
    young_failed = add_message(conn, "failed", 29 * DAY)

    assert purge(database_url) == only(outbox_messages=2)
    assert real not in column(conn, "SELECT message_id FROM outbox_messages")
    assert set(column(conn, "SELECT message_id FROM outbox_messages")) == {old_pending, young_sent, young_failed}
    assert old_failed not in column(conn, "SELECT message_id FROM outbox_messages")
    assert purge(database_url) == NOTHING


def test_the_development_mailbox_is_emptied_after_a_day(conn: psycopg.Connection[Any], database_url: str) -> None:
    sender = DevSmsSender(database_url)
    old, young = str(uuid.uuid4()), str(uuid.uuid4())
    sender.send(message_id=old, to="+14155550123", body="old code")
    sender.send(message_id=young, to="+14155550123", body="new code")
    conn.execute("UPDATE dev_sms_inbox SET received_at = now() - %s WHERE message_id = %s", (DAY + HOUR, old))
    conn.execute("UPDATE dev_sms_inbox SET received_at = now() - %s WHERE message_id = %s", (23 * HOUR, young))

    assert purge(database_url) == only(dev_sms_inbox=1)
    assert [str(m) for m in column(conn, "SELECT message_id FROM dev_sms_inbox")] == [young]
    assert purge(database_url) == NOTHING


# -- webhooks -----------------------------------------------------------------------------------


def add_delivery(conn: psycopg.Connection[Any], status: str, finished_ago: timedelta | None,
                 attempts_ago: tuple[timedelta, ...]) -> int:
    merchant = uuid.uuid4()
    row = conn.execute(
        "INSERT INTO webhook_deliveries (event_id, event_type, position, merchant_id, kind, endpoint_url,"
        " body, status, attempts, next_attempt_at, created_at, delivered_at, dead_at)"
        " VALUES (%(event)s, 'payment.captured', 1, %(merchant)s, 'merchant_webhook', 'https://m.example/h',"
        " '{}', %(status)s, %(n)s, now() - %(created)s, now() - %(created)s,"
        " CASE WHEN %(status)s = 'delivered' THEN now() - %(finished)s::interval END,"
        " CASE WHEN %(status)s = 'dead' THEN now() - %(finished)s::interval END) RETURNING delivery_id",
        {"event": uuid.uuid4(), "merchant": merchant, "status": status, "n": len(attempts_ago),
         "created": max(attempts_ago, default=timedelta(0)) + HOUR, "finished": finished_ago},
    ).fetchone()
    assert row is not None
    for number, ago in enumerate(attempts_ago, 1):
        conn.execute(
            "INSERT INTO webhook_attempts (delivery_id, merchant_id, endpoint_url, attempt, attempted_at,"
            " status_code, duration_ms) VALUES (%s, %s, 'https://m.example/h', %s, now() - %s, 500, 12)",
            (row[0], merchant, number, ago),
        )
    return int(row[0])


def test_webhook_log_and_finished_deliveries_go_after_30_days(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    delivered_old = add_delivery(conn, "delivered", 31 * DAY, (32 * DAY, 31 * DAY))
    dead_old = add_delivery(conn, "dead", 31 * DAY, (33 * DAY, 32 * DAY, 31 * DAY))
    delivered_young = add_delivery(conn, "delivered", 29 * DAY, (29 * DAY,))
    # Redelivered and pending again: the delivery stays; its old attempts are only log lines.
    pending = add_delivery(conn, "pending", None, (40 * DAY, HOUR))
    # Delivered long ago, but the log still keeps an attempt of it: deleting the delivery would
    # cascade to that attempt, so it waits.
    logged = add_delivery(conn, "delivered", 31 * DAY, (10 * DAY,))

    assert purge(database_url) == only(webhook_attempts=6, webhook_deliveries=2)
    assert set(column(conn, "SELECT delivery_id FROM webhook_deliveries")) == {delivered_young, pending, logged}
    assert sorted(column(conn, "SELECT delivery_id FROM webhook_attempts")) == sorted(
        [delivered_young, pending, logged])
    assert not {delivered_old, dead_old} & set(column(conn, "SELECT delivery_id FROM webhook_attempts"))
    assert purge(database_url) == NOTHING


def test_a_delivery_waits_for_its_attempts_when_the_log_is_kept_longer(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    policy = RetentionPolicy(webhook_attempts_after=90 * DAY, webhook_deliveries_after=30 * DAY)
    kept = add_delivery(conn, "delivered", 40 * DAY, (40 * DAY,))
    gone = add_delivery(conn, "dead", 91 * DAY, (92 * DAY, 91 * DAY))
    assert purge(database_url, None, policy) == only(webhook_attempts=2, webhook_deliveries=1)
    assert column(conn, "SELECT delivery_id FROM webhook_deliveries") == [kept]
    assert column(conn, "SELECT delivery_id FROM webhook_attempts") == [kept]
    assert gone not in column(conn, "SELECT delivery_id FROM webhook_deliveries")


# -- risk attempts ------------------------------------------------------------------------------


def test_risk_attempts_go_after_a_day_never_inside_the_velocity_window(
    ledger: Ledger, conn: psycopg.Connection[Any], database_url: str
) -> None:
    assert ledger.velocity is not None
    database_now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    # Through the real counter, each under its own key (it prunes its own key's old rows).
    ledger.velocity.record_and_count("p-old", database_now - DAY - HOUR, 600, {"phone": "k-old"})
    ledger.velocity.record_and_count("p-young", database_now - 23 * HOUR, 600, {"phone": "k-young"})
    ledger.velocity.record_and_count("p-window", database_now - timedelta(minutes=50), 600, {"card": "k-w"})

    assert purge(database_url) == only(risk_attempts=1)
    assert sorted(column(conn, "SELECT attempt_id FROM risk_attempts")) == ["p-window", "p-young"]
    # Asked to keep a minute only, it still keeps the velocity window (and an hour more).
    short = RetentionPolicy(risk_attempts_after=timedelta(minutes=1), velocity_window=timedelta(minutes=10))
    assert purge(database_url, None, short) == only(risk_attempts=1)
    assert column(conn, "SELECT attempt_id FROM risk_attempts") == ["p-window"]
    assert purge(database_url, None, short) == NOTHING


# -- batches, locks, clocks, connections ----------------------------------------------------------


def add_risk_attempts(conn: psycopg.Connection[Any], n: int, age: timedelta, prefix: str) -> None:
    conn.execute(
        "INSERT INTO risk_attempts (kind, key, attempt_id, at)"
        " SELECT 'card', 'k', %s || i, now() - %s FROM generate_series(1, %s) AS i",
        (prefix, age, n),
    )


def test_more_rows_than_a_batch_are_purged_across_batches_and_runs(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    add_risk_attempts(conn, 50, 2 * DAY, "old-")
    add_risk_attempts(conn, 3, HOUR, "young-")
    capped = RetentionPolicy(batch_size=7, max_batches=2)
    assert purge(database_url, None, capped) == only(risk_attempts=14)  # two batches of seven
    assert purge(database_url, None, RetentionPolicy(batch_size=7)) == only(risk_attempts=36)
    assert sorted(column(conn, "SELECT attempt_id FROM risk_attempts")) == ["young-1", "young-2", "young-3"]
    assert purge(database_url, None, RetentionPolicy(batch_size=7)) == NOTHING


def test_an_exact_multiple_of_the_batch_is_purged_whole(conn: psycopg.Connection[Any], database_url: str) -> None:
    add_risk_attempts(conn, 21, 2 * DAY, "old-")
    assert purge(database_url, None, RetentionPolicy(batch_size=7)) == only(risk_attempts=21)
    assert column(conn, "SELECT count(*) FROM risk_attempts") == [0]


def test_rows_another_transaction_holds_are_skipped_not_waited_for(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    add_key(conn, "held", created_ago=3 * DAY, expires_ago=2 * DAY)
    add_key(conn, "free", created_ago=3 * DAY, expires_ago=2 * DAY)
    with psycopg.connect(database_url) as other:
        other.execute("SELECT 1 FROM idempotency_records WHERE idempotency_key = 'held' FOR UPDATE")
        assert purge(database_url, None, RetentionPolicy(lock_timeout=timedelta(seconds=30))) == only(
            idempotency_records=1)
        other.rollback()
    assert column(conn, "SELECT idempotency_key FROM idempotency_records") == ["held"]
    assert purge(database_url) == only(idempotency_records=1)


def test_a_clock_ahead_of_the_database_deletes_nothing_young(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    add_risk_attempts(conn, 2, HOUR, "young-")
    database_now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    assert purge(database_url, database_now + 10 * DAY) == NOTHING
    # An earlier "now" is honoured: nothing is old as of yesterday either.
    add_risk_attempts(conn, 1, 3 * DAY, "old-")
    assert purge(database_url, database_now - 3 * DAY) == NOTHING
    assert purge(database_url, database_now) == only(risk_attempts=1)


def test_a_connection_is_used_batch_by_batch_but_not_inside_a_transaction(
    conn: psycopg.Connection[Any], database_url: str
) -> None:
    add_risk_attempts(conn, 3, 2 * DAY, "old-")
    with psycopg.connect(database_url) as plain:  # not autocommit, idle: each batch commits
        assert purge(plain, None, RetentionPolicy(batch_size=2)) == only(risk_attempts=3)
        plain.execute("SELECT 1")  # now inside a transaction
        with pytest.raises(ValueError, match="outside any transaction"):
            purge(plain)
    assert column(conn, "SELECT count(*) FROM risk_attempts") == [0]


# -- what is never deleted --------------------------------------------------------------------------


def test_the_outbox_is_never_purged_and_a_rebuild_still_matches(
    ledger: Ledger, conn: psycopg.Connection[Any], database_url: str, owner_database_url: str, settings: Settings
) -> None:
    """Even published rows that every projection applied and the webhook planner planned stay:
    replay and replay --verify rebuild the read models from the outbox, from position 0."""
    merchant = new_merchant(ledger, webhook_url="https://merchant.example/hooks")
    pay(ledger, open_session(ledger, merchant))
    opener = envelope_opener(settings)
    store = ProjectionStore(database_url, list(all_projections(personal_data_reader(settings)).values()), opener)
    store.catch_up(grace=timedelta(0))
    store.close()
    planner = WebhookPlanner(database_url, opener)
    planner.plan()
    planner.close()
    conn.execute("DELETE FROM outbox_pending")  # every row published
    conn.execute("UPDATE outbox SET created_at = now() - %(age)s", {"age": 90 * DAY})
    total, newest = conn.execute("SELECT count(*), max(position) FROM outbox").fetchone()  # type: ignore[misc]
    assert total > 5
    assert column(conn, "SELECT min(position) FROM projection_checkpoints") == [newest]
    assert column(conn, "SELECT position FROM webhook_checkpoint") == [newest]

    assert "outbox" not in purge(database_url)
    assert column(conn, "SELECT count(*) FROM outbox") == [total]
    projections = list(all_projections(personal_data_reader(settings)).values())
    assert verify(owner_database_url, projections, opener) == []  # replay: an owner's tool

    # Why: deleting just the oldest such row (published, applied by every projection, planned,
    # 90 days old) already makes a rebuild differ from the live read models.
    conn.execute("DELETE FROM outbox WHERE position = (SELECT min(position) FROM outbox)")
    assert verify(owner_database_url, projections, opener) != []


def test_cards_never_attached_go_after_a_day_attached_ones_stay(
    conn: psycopg.Connection[Any], database_url: str, ledger: Ledger
) -> None:
    """The event store marks a vaulted card attached in the transaction that attaches it to a
    payment; a card typed but never attached is deleted after a day, an attached one is kept."""
    database_now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    vault = CardVault(database_url, b"v" * 32)
    try:
        year = database_now.year + 2
        old_orphan = vault.tokenize("4242 4242 4242 4242", 12, year, now=database_now - 2 * DAY)
        young_orphan = vault.tokenize("5555 5555 5555 4444", 12, year, now=database_now - timedelta(hours=1))
        paid = vault.tokenize("4000 0566 5566 5556", 12, year, now=database_now - 2 * DAY)
    finally:
        vault.close()
    session_id = open_session(ledger, new_merchant(ledger))
    link = ledger.send_link("send", session_id)
    ledger.verify_code("code", session_id, link.code)
    payment_id = ledger.attach_payment_method("attach", session_id, card_token=paid.token, card_brand=paid.brand,
                                              card_last4=paid.last4).result["payment_id"]
    assert column(conn, "SELECT payment_id::text FROM card_vault WHERE token = %s", paid.token) == [payment_id]

    assert purge(database_url) == only(card_vault=1)
    assert sorted(column(conn, "SELECT token FROM card_vault")) == sorted([young_orphan.token, paid.token])
    assert old_orphan.token not in column(conn, "SELECT token FROM card_vault")
    assert purge(database_url) == NOTHING

    # A card deleted as never attached cannot be attached afterwards: the attach is refused whole.
    second = open_session(ledger, new_merchant(ledger, "m-late"), "open-late")
    link = ledger.send_link("send-late", second)
    ledger.verify_code("code-late", second, link.code)
    with pytest.raises(InvalidPaymentMethod, match="no longer on file"):
        ledger.attach_payment_method("attach-late", second, card_token=old_orphan.token, card_brand="visa",
                                     card_last4="4242")
    assert ledger.get_session(second).status == "code_verified"


# -- policy and loop -----------------------------------------------------------------------------------


def test_policy_overrides_are_read_from_text() -> None:
    policy = parse_policy("sms_after=7d, dev_sms_after=12h,batch_size=500,pause=250s")
    assert (policy.sms_after, policy.dev_sms_after, policy.batch_size, policy.pause) == (
        7 * DAY, 12 * HOUR, 500, timedelta(seconds=250))
    assert policy.webhook_attempts_after == RetentionPolicy().webhook_attempts_after
    assert parse_policy("") == RetentionPolicy()
    for bad in ("sms_after=7", "sms_after=-1d", "nothing=1d", "batch_size=x", "sms_after", "sms_after=0d",
                "batch_size=0"):
        with pytest.raises(ValueError):
            parse_policy(bad)


class Logs(list[dict[str, Any]]):
    """Stands in for the module's structlog logger (whatever structlog's configuration is)."""

    def _add(self, event: str, **fields: Any) -> None:
        self.append({"event": event, **fields})

    info = warning = exception = _add

    def named(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self if entry["event"] == event]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Logs:
    recorded = Logs()
    monkeypatch.setattr(retention, "log", recorded)
    return recorded


def run_until(database_url: str, logs: Logs, event: str, count: int, every_s: float) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=run_retention, args=(database_url, stop), kwargs={"every_s": every_s})
    thread.start()
    for _ in range(200):
        if len(logs.named(event)) >= count:
            break
        time.sleep(0.05)
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "the loop ends soon after stop is set"
    assert logs.named("retention_stopped")


def test_the_loop_purges_at_once_logs_counts_and_stops(
    conn: psycopg.Connection[Any], database_url: str, logs: Logs
) -> None:
    add_risk_attempts(conn, 4, 2 * DAY, "old-")
    run_until(database_url, logs, "retention_purged", 1, every_s=3600)
    (purged,) = logs.named("retention_purged")  # once at start, then it waits its hour
    assert purged["risk_attempts"] == 4 and purged["total"] == 4 and purged["outbox_messages"] == 0
    assert column(conn, "SELECT count(*) FROM risk_attempts") == [0]


def test_the_loop_survives_a_database_it_cannot_reach(logs: Logs) -> None:
    run_until("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", logs, "retention_database_error", 2,
              every_s=0.05)
    assert len(logs.named("retention_database_error")) >= 2
    assert not logs.named("retention_purged")

