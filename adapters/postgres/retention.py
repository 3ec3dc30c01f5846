"""Data retention: rows that grow with traffic and are no longer needed are deleted, in small
batches, so the side tables stop growing forever and personal data is not kept longer than needed.

What goes (``RetentionPolicy`` holds the ages):

* ``idempotency_records``: a day past ``expires_at`` (and past any claim's ``locked_until``).
  An expired record already counts as absent (``IdempotencyStore.begin`` starts afresh), and the
  Redis copy lives ``KEY_LIFETIME`` too, so the API's 24 h replay window is untouched.
* ``outbox_messages``: ``sent`` or ``failed`` SMS 30 days old. Never a ``pending`` one. They hold
  the customer's phone number, encrypted: personal data kept no longer than needed.
* ``dev_sms_inbox``: the development mailbox, after a day.
* ``webhook_attempts``: the delivery log, after 30 days.
* ``webhook_deliveries``: ``delivered`` or ``dead`` ones 30 days after they got there (never a
  ``pending`` one), and only when no attempt the log still keeps points at them: attempts are
  deleted with their delivery (``ON DELETE CASCADE``), so a delivery waits for its attempts.
  Redelivery (``webhooks redeliver``) is possible within that window only.
* ``risk_attempts``: after a day, and never inside the velocity window (plus an hour).
* ``card_vault``: cards typed on the payment page but never attached to a payment, after a day.
  The event store marks a card attached (``attached_at``) in the transaction that records
  ``payment_method_attached``; attached cards stay.

What stays, on purpose:

* ``outbox``: every reader of old rows would break. ``echotransact replay`` and ``replay
  --verify`` (projections/replay.py) rebuild the read models from the outbox from position 0;
  a projection without a checkpoint row (a new one) starts at 0 as well; the webhook planner
  re-plans from its checkpoint. Deleting published, applied and planned rows would silently
  make a rebuild differ from the live read models. Events themselves are the ledger and are
  never deleted either.
* ``command_log``: commands' own idempotency (a retry must return the recorded result).

Every batch is one short transaction: ``DELETE ... WHERE ctid = ANY(ARRAY(SELECT ctid ... LIMIT
n FOR UPDATE SKIP LOCKED)) AND <rule>``. Rows another transaction holds are skipped (the next run
gets them), and the rule is checked again on the row being deleted, so a row changed meanwhile
(a redelivered webhook, a reclaimed idempotency key) stays. Running twice deletes nothing more.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg import sql

__all__ = ["TABLES", "RetentionPolicy", "parse_policy", "purge", "run_retention"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind of row is kept, and how the deleting is paced."""

    # Past expires_at: an expired key is already treated as new by the API.
    idempotency_after_expiry: timedelta = timedelta(hours=24)
    sms_after: timedelta = timedelta(days=30)
    dev_sms_after: timedelta = timedelta(days=1)
    webhook_attempts_after: timedelta = timedelta(days=30)
    # Counted from delivered_at / dead_at.
    webhook_deliveries_after: timedelta = timedelta(days=30)
    risk_attempts_after: timedelta = timedelta(days=1)
    # Cards typed on the payment page but never attached to a payment (the customer gave up,
    # or the link expired): card data is kept no longer than it can be used.
    vault_unattached_after: timedelta = timedelta(days=1)
    # The risk rules' velocity window (RiskPolicy.velocity_window_minutes): attempts are kept at
    # least this long plus an hour, whatever risk_attempts_after says.
    velocity_window: timedelta = timedelta(minutes=10)
    # Rows per DELETE, and DELETEs per table per run (the rest waits for the next run).
    batch_size: int = 1_000
    max_batches: int = 1_000
    # A batch gives up rather than wait longer than this for a lock (it is tried next run).
    lock_timeout: timedelta = timedelta(seconds=5)
    # Pause between batches, for replicas and the rest of the workload.
    pause: timedelta = timedelta(0)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, timedelta) and value < timedelta(0):
                raise ValueError(f"retention {f.name} must not be negative")
        for name in ("sms_after", "dev_sms_after", "webhook_attempts_after", "webhook_deliveries_after",
                     "risk_attempts_after", "vault_unattached_after"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"retention {name} must be positive")
        if self.vault_unattached_after < timedelta(hours=1):
            # Longer than any payment link lives (15 min by default): a card being attached
            # right now is never old enough to go.
            raise ValueError("retention vault_unattached_after must be at least 1h")
        if self.batch_size < 1 or self.max_batches < 1:
            raise ValueError("retention batch_size and max_batches must be positive")

    @property
    def risk_attempts_kept(self) -> timedelta:
        return max(self.risk_attempts_after, self.velocity_window + timedelta(hours=1))


_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_policy(text: str, base: RetentionPolicy | None = None) -> RetentionPolicy:
    """``sms_after=30d,dev_sms_after=12h,batch_size=500``: RetentionPolicy fields; durations are
    a whole number with s, m, h or d. Raises ValueError naming the part it cannot read."""
    policy = base or RetentionPolicy()
    kinds = {f.name: getattr(policy, f.name) for f in fields(RetentionPolicy)}
    changes: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (x.strip() for x in part.partition("="))
        if not sep or name not in kinds:
            raise ValueError(f"retention setting {part!r}: expected one of {', '.join(kinds)} as name=value")
        if isinstance(kinds[name], timedelta):
            match = _DURATION.match(value)
            if match is None:
                raise ValueError(f"retention setting {part!r}: a duration is a number with s, m, h or d")
            changes[name] = timedelta(**{_UNITS[match[2]]: int(match[1])})
        else:
            if not value.isdigit():
                raise ValueError(f"retention setting {part!r}: expected a whole number")
            changes[name] = int(value)
    return replace(policy, **changes)


@dataclass(frozen=True)
class _Rule:
    table: str
    # The rule on a row of ``table`` aliased ``r``, with named parameters (cutoffs).
    where: str


# In this order: attempts before their deliveries.
_RULES: tuple[_Rule, ...] = (
    _Rule("idempotency_records",
          "r.expires_at < %(idempotency)s AND r.locked_until < %(idempotency)s"),
    # Sent ones by sent_at; failed ones by their last attempt (next_attempt_at is set from it).
    _Rule("outbox_messages",
          "r.state IN ('sent', 'failed') AND r.created_at < %(sms)s"
          " AND COALESCE(r.sent_at, r.next_attempt_at) < %(sms)s"),
    _Rule("dev_sms_inbox", "r.received_at < %(dev_sms)s"),
    _Rule("webhook_attempts", "r.attempted_at < %(webhook_attempts)s"),
    # Two rules, one per status, so each uses its own partial index.
    _Rule("webhook_deliveries",
          "r.status = 'delivered' AND r.delivered_at < %(webhook_deliveries)s"
          " AND NOT EXISTS (SELECT FROM webhook_attempts a WHERE a.delivery_id = r.delivery_id"
          " AND a.attempted_at >= %(webhook_attempts)s)"),
    _Rule("webhook_deliveries",
          "r.status = 'dead' AND r.dead_at < %(webhook_deliveries)s"
          " AND NOT EXISTS (SELECT FROM webhook_attempts a WHERE a.delivery_id = r.delivery_id"
          " AND a.attempted_at >= %(webhook_attempts)s)"),
    _Rule("risk_attempts", "r.at < %(risk)s"),
    _Rule("card_vault", "r.attached_at IS NULL AND r.created_at < %(vault)s"),
)

TABLES: tuple[str, ...] = tuple(dict.fromkeys(rule.table for rule in _RULES))


def _statement(rule: _Rule) -> sql.Composed:
    where = sql.SQL(rule.where)  # constants of this module, never input
    return sql.SQL(
        "DELETE FROM {table} AS r WHERE r.ctid = ANY(ARRAY("
        "SELECT r.ctid FROM {table} AS r WHERE {where} LIMIT %(limit)s FOR UPDATE OF r SKIP LOCKED"
        ")) AND {where}"
    ).format(table=sql.Identifier(rule.table), where=where)


def _cutoffs(now: datetime, policy: RetentionPolicy) -> dict[str, datetime]:
    return {
        "idempotency": now - policy.idempotency_after_expiry,
        "sms": now - policy.sms_after,
        "dev_sms": now - policy.dev_sms_after,
        "webhook_attempts": now - policy.webhook_attempts_after,
        "webhook_deliveries": now - policy.webhook_deliveries_after,
        "risk": now - policy.risk_attempts_kept,
        "vault": now - policy.vault_unattached_after,
    }


def purge(
    database: str | psycopg.Connection[Any],
    now: datetime | None = None,
    policy: RetentionPolicy | None = None,
    *,
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """Delete what ``policy`` no longer keeps, as of ``now``; returns the rows deleted per table
    (every table of ``TABLES``, zeros included).

    ``now`` defaults to the database's clock, and is never taken later than it: a process whose
    clock runs ahead cannot delete young rows. ``database`` is a URL, or a connection that is not
    inside a transaction (each batch commits on its own). ``stop`` ends the run between batches."""
    policy = policy or RetentionPolicy()
    if isinstance(database, str):
        with psycopg.connect(database, autocommit=True, application_name="echotransact-retention") as conn:
            return _purge(conn, now, policy, stop)
    if database.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("purge commits batch by batch: pass a connection outside any transaction")
    return _purge(database, now, policy, stop)


def _purge(
    conn: psycopg.Connection[Any], now: datetime | None, policy: RetentionPolicy, stop: threading.Event | None
) -> dict[str, int]:
    with conn.transaction():
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    database_now: datetime = row[0]
    if now is None or now > database_now:
        now = database_now
    params: dict[str, Any] = {**_cutoffs(now, policy), "limit": policy.batch_size}
    lock_timeout = f"{max(1, round(policy.lock_timeout.total_seconds() * 1000))}ms"
    deleted = dict.fromkeys(TABLES, 0)
    for rule in _RULES:
        statement = _statement(rule)
        for batch in range(policy.max_batches):
            if stop is not None and stop.is_set():
                return deleted
            try:
                with conn.transaction():
                    conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
                    count = conn.execute(statement, params).rowcount
            except psycopg.errors.LockNotAvailable:
                log.info("retention_lock_timeout", table=rule.table)
                break
            deleted[rule.table] += count
            if count < policy.batch_size:
                break
            if batch == policy.max_batches - 1:
                log.warning("retention_batches_exhausted", table=rule.table, deleted=deleted[rule.table],
                            max_batches=policy.max_batches, batch_size=policy.batch_size)
            elif policy.pause > timedelta(0):
                if stop is not None:
                    stop.wait(policy.pause.total_seconds())
                else:
                    time.sleep(policy.pause.total_seconds())
    return deleted


def run_retention(
    database_url: str,
    stop: threading.Event,
    every_s: float = 3600.0,
    policy: RetentionPolicy | None = None,
) -> None:
    """Purge at once, then every ``every_s`` seconds, until ``stop`` is set. A failed run is
    logged and the loop goes on; several processes running it at once share the work."""
    policy = policy or RetentionPolicy()
    log.info("retention_started", every_s=every_s, batch_size=policy.batch_size)
    while not stop.is_set():
        started = time.monotonic()
        try:
            deleted = purge(database_url, None, policy, stop=stop)
        except psycopg.Error as error:
            log.warning("retention_database_error", error=f"{type(error).__name__}: {error}")
        except Exception:  # the loop must outlive any one failure
            log.exception("retention_failed")
        else:
            log.info("retention_purged", duration_ms=round((time.monotonic() - started) * 1000),
                     total=sum(deleted.values()), **deleted)
        stop.wait(every_s)
    log.info("retention_stopped")
