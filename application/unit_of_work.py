"""What every use case of the ledger shares: one command is one unit of work, idempotent by its
command id.

``_execute`` looks the command id up in the command log (same request -> the recorded result;
different request -> ``IdempotencyKeyReused``), loads, decides, and saves the events together
with their outbox rows, the SMS they queue and the command record in one transaction, retrying
on a lost optimistic-concurrency race. The use cases (merchants.py, api_keys.py, sessions.py,
payments.py) are mixins over ``LedgerBase``; ledger.py composes them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar
from uuid import NAMESPACE_URL, UUID, uuid5

import msgspec
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, MutableOrImmutableAggregate
from eventsourcing.persistence import InfrastructureFactory, IntegrityError
from eventsourcing.utils import Environment

from application import hashing
from application.aggregate_types import AGGREGATE_TYPES
from application.envelope import DEFAULT_TOPIC_PREFIX, outbox_rows
from application.errors import ConcurrencyConflict, IdempotencyKeyReused, NotFound
from application.ports import Clock, CommandLog, CommandRecord, OutboxSms
from domain.api_key import ApiKey
from domain.customer import Customer
from domain.errors import DomainError
from domain.merchant import Merchant
from domain.money import check_currency
from domain.payment import Payment
from domain.payment_session import PaymentSession, default_identity_thresholds_minor
from domain.payout import PayoutAccount
from domain.risk import DEFAULT_POLICY as DEFAULT_RISK_POLICY
from domain.risk import RiskPolicy

_MAX_SAVE_ATTEMPTS = 8
# Aggregates never snapshotted (LedgerBase.snapshotting_intervals): loaded without asking the
# snapshot table, a round trip saved on every load of a session or a payment.
_FOLDED_FROM_EVENTS: frozenset[type[Any]] = frozenset({PaymentSession, Payment})
# How long a merchant read by a command is used without asking the event store whether it
# changed (a change saved by another process reaches this one within it).
MERCHANT_FRESH_S = 1.0
# The request hash of every recorded command depends on these bytes: keep the encoding.
_canonical = msgspec.json.Encoder(order="sorted")
_COMMAND_NAMESPACE = uuid5(NAMESPACE_URL, "https://echotransact.example/commands")


@dataclass(frozen=True)
class LedgerPolicy:
    """Settings the business owns; the composition root builds them from the environment."""

    secret_key: bytes
    link_lifetime: timedelta = timedelta(minutes=15)
    authorization_lifetime: timedelta = timedelta(days=7)
    identity_thresholds_minor: Mapping[str, int] = field(
        default_factory=default_identity_thresholds_minor
    )
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    # Where customers reach the payment page; the SMS links to <public_url>/pay/<token>.
    public_url: str = "http://127.0.0.1:8000"
    risk: RiskPolicy = DEFAULT_RISK_POLICY
    # How long a passed identity check spares the customer a new one on later purchases.
    identity_reuse: timedelta = timedelta(days=365)

    def identity_threshold_minor(self, currency: str) -> int:
        check_currency(currency)
        return self.identity_thresholds_minor[currency]


@dataclass(frozen=True)
class CommandResult:
    result: dict[str, Any]
    position: int | None
    replayed: bool = False
    # The aggregates this command saved, as saved (empty for a replay): a caller answers from
    # them instead of loading them again.
    saved: tuple[Aggregate, ...] = field(default=(), compare=False, repr=False)

    def saved_one(self, cls: type[Any], aggregate_id: UUID) -> Any | None:
        return next((a for a in self.saved if isinstance(a, cls) and a.id == aggregate_id), None)


class Known:
    """Aggregates a caller already holds as a command saved them (``CommandResult.saved``), handed
    to the next command so its decision starts from them instead of loading them again. Each is
    taken once: a decision that runs again after a lost race (the save's version check) loads
    afresh, so a stale or half-changed copy is never saved."""

    def __init__(self, aggregates: Iterable[Aggregate] = ()) -> None:
        self._by_id: dict[UUID, Aggregate] = {a.id: a for a in aggregates}

    def peek(self, cls: type[Any], aggregate_id: UUID) -> Any | None:
        found = self._by_id.get(aggregate_id)
        return found if isinstance(found, cls) else None

    def take(self, cls: type[Any], aggregate_id: UUID) -> Any | None:
        found = self.peek(cls, aggregate_id)
        self._by_id.pop(aggregate_id, None)
        return found


@dataclass(frozen=True)
class LinkIssued:
    """Returned only in memory to the caller that delivers the SMS; never stored in plain text."""

    result: CommandResult
    link_token: str
    code: str


Decide = Callable[[], tuple[Sequence[Aggregate], dict[str, Any]]]


def project(aggregate: Any, events: Iterable[Any]) -> Any:
    """Each event applied in turn: the library's ``project_aggregate`` without its check of
    every event against a runtime-checkable Protocol (``assert isinstance``: about 12 us an event
    on Python 3.11, the bulk of folding a payment session). Our events are the aggregates' own
    nested classes, all of which mutate."""
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


class LedgerBase(Application):
    """The event store, the command log and the loaders; no use case of its own."""

    env: ClassVar[dict[str, str]] = {
        # Which event store (and recorder) holds the events is the composition root's choice.
        "ORIGINATOR_ID_TYPE": "uuid",
    }
    # Long-lived aggregates keep snapshots, and loading one asks the snapshot table first. A
    # payment session (minutes) and a payment (weeks, tens of events at most) are not
    # snapshotted: ``_get`` folds them from their events with one query, not two (see
    # _FOLDED_FROM_EVENTS; snapshots an older version took of them are left unread).
    snapshotting_intervals: ClassVar[dict[type[MutableOrImmutableAggregate[Any]], int]] = {
        Merchant: 50,
        ApiKey: 50,
        Customer: 50,
        PayoutAccount: 50,
    }

    def __init__(
        self, env: Mapping[str, str] | None = None, *, policy: LedgerPolicy, clock: Clock,
        factory: Callable[[Environment], InfrastructureFactory[Any]] | None = None,
    ) -> None:
        """``factory``: builds the event store's infrastructure from the ledger's environment
        (the composition root's, over the process's one connection pool); without it the
        library builds one from ``env`` (PERSISTENCE_MODULE; the in-memory store by default)."""
        self._build_factory = factory
        super().__init__(env)
        self.policy = policy
        self.clock = clock
        self._merchants_read: dict[UUID, tuple[float, Merchant]] = {}
        self._merchants_read_lock = threading.Lock()
        # Bumped when this process saves a merchant: a read that began before the save does not
        # keep what it read (it may be the older version).
        self._merchants_saved = 0

    def construct_factory(self, env: Environment) -> InfrastructureFactory[Any]:
        if self._build_factory is not None:
            return self._build_factory(env)
        return super().construct_factory(env)

    @property
    def command_log(self) -> CommandLog:
        return self.recorder  # type: ignore[return-value]

    def _record(self, processing_event: Any) -> Any:
        """Add one outbox row per event, so the recorder writes both in one transaction."""
        processing_event.saved_kwargs["outbox"] = outbox_rows(
            processing_event.events, processing_event.aggregates, aggregate_types=AGGREGATE_TYPES,
            mapper=self.mapper, topic_prefix=self.policy.topic_prefix,
        )
        processing_event.saved_kwargs["vault_attachments"] = [
            (event.card_token, event.payment_id) for event in processing_event.events
            if isinstance(event, PaymentSession.PaymentMethodAttached)
        ]
        recordings = super()._record(processing_event)
        for aggregate in processing_event.aggregates.values():
            if isinstance(aggregate, Merchant):  # saved: the next command reads it afresh
                with self._merchants_read_lock:
                    self._merchants_saved += 1
                    self._merchants_read.pop(aggregate.id, None)
        return recordings

    def keyed_hash(self, purpose: str, *parts: object) -> str:
        return hashing.keyed_hash(self.policy.secret_key, purpose, *parts)

    def _execute(
        self, command_id: str, command_name: str, request: Mapping[str, Any], aggregate_id: UUID | None,
        decide: Decide, messages: Callable[[], Sequence[OutboxSms]] | None = None, *,
        creates: bool = False,
    ) -> CommandResult:
        """``creates``: the command creates ``aggregate_id`` (derived from the command id), so a
        command that already ran cannot save again (its version 1 exists): the command log is
        read only after such a lost race, not before every first attempt."""
        request_hash = self.keyed_hash("request", _canonical.encode([command_name, request]).decode())
        for attempt in range(_MAX_SAVE_ATTEMPTS):
            existing = None if creates and attempt == 0 else self.command_log.get_command(command_id)
            if existing is not None:
                if existing.request_hash != request_hash or existing.command_name != command_name:
                    raise IdempotencyKeyReused(
                        f"command id {command_id!r} was already used for a different request"
                    )
                return CommandResult(existing.result, existing.position, replayed=True)
            try:
                aggregates, result = decide()
            except DomainError:
                if creates and attempt == 0:
                    # The command may have run before, when its decision still went through
                    # (a merchant deactivated since, say): its recorded result, if any, wins.
                    continue
                raise
            record = CommandRecord(command_id, command_name, request_hash, aggregate_id, result)
            try:
                recordings = self.save(*aggregates, command=record, messages=messages() if messages else ())
            except IntegrityError:
                # Lost a race: another writer saved this aggregate version or this command id
                # first. Look again; the loop re-reads the log and the aggregates.
                continue
            position = recordings[-1].notification.id if recordings else None
            return CommandResult(result, position, saved=tuple(aggregates))
        raise ConcurrencyConflict(
            f"{command_name} kept losing the race for {aggregate_id}; retry the request"
        )

    def _change_many(self, cls: type[Any], aggregate_ids: Sequence[UUID], change: Callable[[Any], None]) -> int:
        """Apply ``change`` to each of these aggregates (missing ones are skipped) and save all
        that changed with one statement, again from a fresh load after a lost race. No command
        record: ``change`` must itself be idempotent (it records nothing the aggregate already
        holds), so a batch done twice records nothing twice. Returns how many changed."""
        for _ in range(_MAX_SAVE_ATTEMPTS):
            changed = []
            for aggregate in self._get_many(cls, aggregate_ids).values():
                before = aggregate.version
                change(aggregate)
                if aggregate.version != before:
                    changed.append(aggregate)
            if not changed:
                return 0
            try:
                self.save(*changed)
            except IntegrityError:
                continue
            return len(changed)
        raise ConcurrencyConflict(f"a batch of {len(aggregate_ids)} kept losing the race; retry it")

    def _derived_id(self, command_id: str, kind: str) -> UUID:
        return uuid5(_COMMAND_NAMESPACE, f"{kind}:{command_id}")

    def _get(self, cls: type[Any], aggregate_id: UUID, merchant_id: UUID | None = None) -> Any:
        """Load an aggregate; another merchant's aggregate is as missing as a missing one."""
        aggregate: Any
        if cls in _FOLDED_FROM_EVENTS:
            aggregate = project(None, self.repository.event_store.get(aggregate_id))
        else:
            try:
                aggregate = self.repository.get(aggregate_id, projector_func=project)
            except AggregateNotFoundError:
                aggregate = None
        if (
            not isinstance(aggregate, cls)
            or (merchant_id is not None and getattr(aggregate, "merchant_id", None) != merchant_id)
        ):
            raise NotFound(f"no {AGGREGATE_TYPES[cls].replace('_', ' ')} {aggregate_id}")
        return aggregate

    def _get_many(self, cls: type[Any], aggregate_ids: Sequence[UUID]) -> dict[UUID, Any]:
        """Several aggregates of one class, their events read with one query when the recorder
        can (``select_events_of``), else one by one; each folded from its first event (no
        snapshot: every aggregate loaded so costs one row per event, fine for short lives like a
        payment's). Missing ones (or of another class) are left out."""
        select_many = getattr(self.recorder, "select_events_of", None)
        if select_many is None:
            found = {}
            for aggregate_id in aggregate_ids:
                try:
                    found[aggregate_id] = self._get(cls, aggregate_id)
                except NotFound:
                    continue
            return found
        aggregates: dict[UUID, Any] = {}
        for stored in select_many(list(dict.fromkeys(aggregate_ids))):
            domain_event: Any = self.mapper.to_domain_event(stored)
            aggregates[stored.originator_id] = domain_event.mutate(aggregates.get(stored.originator_id))
        return {i: a for i, a in aggregates.items() if isinstance(a, cls)}

    def get_session(self, session_id: UUID, merchant_id: UUID | None = None) -> PaymentSession:
        return self._get(PaymentSession, session_id, merchant_id)

    def get_payment(self, payment_id: UUID, merchant_id: UUID | None = None) -> Payment:
        return self._get(Payment, payment_id, merchant_id)

    def get_payment_as_of(self, payment_id: UUID, as_of: datetime, merchant_id: UUID | None = None) -> Payment | None:
        """The payment as it was at ``as_of``: folded from its events in order up to the last that
        occurred at or before then. Missing (or another merchant's) is ``NotFound`` as in
        ``get_payment``, decided on the payment as it is now; None when it did not exist yet."""
        events: list[Any] = list(self.repository.event_store.get(payment_id))
        now = self._fold(events)
        if not isinstance(now, Payment) or (merchant_id is not None and now.merchant_id != merchant_id):
            raise NotFound(f"no payment {payment_id}")
        # A prefix, never events picked out of order: one stamped after as_of ends it.
        upto = next((i for i, event in enumerate(events) if event.timestamp > as_of), len(events))
        return self._fold(events[:upto]) if upto else None

    @staticmethod
    def _fold(events: Sequence[Any]) -> Any:
        return project(None, events)

    def get_merchant(self, merchant_id: UUID) -> Merchant:
        return self._get(Merchant, merchant_id)

    def merchant_to_read(self, merchant_id: UUID) -> Merchant:
        """The merchant as it is now, for reading only (a command's checks, the name on a payment
        page): a command that changes a merchant loads it with ``get_merchant``. Kept in memory:
        used as it is for MERCHANT_FRESH_S after it was last checked, then checked with one query
        for newer events; a newer merchant replaces the kept one, which is never changed, so
        threads share it. A change saved by this process drops the kept one at once
        (``_record``); one saved by another process is seen within MERCHANT_FRESH_S."""
        now = time.monotonic()
        saved_before = self._merchants_saved
        kept = self._merchants_read.get(merchant_id)
        if kept is not None:
            checked_at, merchant = kept
            if now - checked_at < MERCHANT_FRESH_S:
                return merchant
            if self.recorder.select_events(merchant_id, gt=merchant.version, limit=1):
                merchant = self.get_merchant(merchant_id)
        else:
            merchant = self.get_merchant(merchant_id)
        with self._merchants_read_lock:
            if self._merchants_saved != saved_before:
                return merchant  # used by this command, not kept: a save may have overtaken it
            if len(self._merchants_read) >= 10_000:
                self._merchants_read.clear()
            self._merchants_read[merchant_id] = (now, merchant)
        return merchant
