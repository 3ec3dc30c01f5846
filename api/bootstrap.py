"""The composition root: settings from the environment, and every object built from them.

Nothing connects at import time; each ``build_*`` function is called by an entry point.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from adapters.clock import SystemClock
from adapters.dev.identity import DevIdentityVerifier
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.postgres.connection import open_pool
from adapters.postgres.locks import PostgresAdvisoryLocks
from adapters.postgres.velocity import PostgresVelocityCounter
from api.metrics import observed
from api.settings import ConfigurationError, Settings
from application.envelope import EnvelopeOpener
from application.ledger import Ledger, LedgerPolicy
from application.ports import Clock, PaymentProcessor, ProcessorRouter

if TYPE_CHECKING:
    from adapters.notifications.sms import MessageDispatcher
    from adapters.personal_data import KeyCipher
    from adapters.postgres.customer_keys import PostgresCustomerKeys, PostgresPersonalDataReader
    from api.http.services import ApiServices


# Connections above a pool's minimum close after this long unused (psycopg_pool closes one per
# period): the whole system at rest holds a handful, not one per thread that was ever busy.
POOL_MAX_IDLE_S = 2.0
# The longest a request waits for a pooled connection (or a new one to open).
CONNECTION_WAIT_S = 3
# A process's pool: enough for the API's worker threads, each holding one connection at a time
# (two while it holds a payment's advisory lock: at most LOCK_HOLDERS do).
POOL_MAX_SIZE = 20
LOCK_HOLDERS = 8
# How often the dispute clock looks for evidence due soon (a reminder) or overdue (expiry).
DISPUTE_CLOCK_EVERY_S = 60.0


def eventsourcing_env(database_url: str) -> dict[str, str]:
    """The eventsourcing library's own PostgreSQL settings for ``database_url``, for the library
    used on its own (the benchmark's baseline), sized and checked like the process's pool; the
    ledger itself runs on that pool (build_ledger)."""
    parts = conninfo_to_dict(database_url)
    return {
        "POSTGRES_DBNAME": str(parts.get("dbname") or "postgres"),
        "POSTGRES_HOST": str(parts.get("host") or "127.0.0.1"),
        "POSTGRES_PORT": str(parts.get("port") or "5432"),
        "POSTGRES_USER": str(parts.get("user") or os.environ.get("USER", "postgres")),
        "POSTGRES_PASSWORD": str(parts.get("password") or ""),
        "POSTGRES_POOL_SIZE": "1",
        "POSTGRES_MAX_OVERFLOW": str(POOL_MAX_SIZE - 1),
        "POSTGRES_LOCK_TIMEOUT": "5",
        "POSTGRES_CONNECT_TIMEOUT": str(CONNECTION_WAIT_S),
        "POSTGRES_PRE_PING": "y",
    }


APP_ROLE = "echotransact_app"  # the application's login role (migrations/0015_roles.sql)


def app_database_url(owner_url: str) -> str:
    """The application's connection string on the server and database of ``owner_url``, as the
    login role echotransact_app. For an embedded server, whose URL names its superuser and
    whose unix socket trusts every role; a password in ``owner_url`` is the owner's and is dropped.
    Configured servers give the application's URL themselves (DATABASE_URL)."""
    parts = conninfo_to_dict(owner_url)
    parts.pop("password", None)
    parts["user"] = APP_ROLE
    return make_conninfo("", **parts)


def open_database(database_url: str) -> ConnectionPool[Any]:
    """The process's one PostgreSQL pool: the event store, idempotency records, the vault,
    velocity counts, advisory locks and the read views all borrow from it."""
    return open_pool(database_url, max_size=POOL_MAX_SIZE, max_idle_s=POOL_MAX_IDLE_S, wait_s=CONNECTION_WAIT_S)


def build_processors(settings: Settings) -> PaymentProcessor | ProcessorRouter:
    """The configured primary and secondary behind a failover router, or, with none
    configured, the in-process sandbox."""
    if not settings.processors:
        return SandboxProcessor()
    from adapters.processors.client import FailoverRouter, HttpProcessor

    (primary, primary_url), (secondary, secondary_url) = settings.processors.items()
    return FailoverRouter(HttpProcessor(primary, primary_url), HttpProcessor(secondary, secondary_url))


def build_ledger(
    settings: Settings,
    database: str | ConnectionPool[Any],
    *,
    clock: Clock | None = None,
    processor: PaymentProcessor | ProcessorRouter | None = None,
    **extra: Any,
) -> Ledger:
    """The ledger on PostgreSQL: over the process's pool when given one (which its owner
    closes), else over a pool of its own for ``database`` (closed with the ledger)."""
    from adapters.dev.fx import SandboxFxRates
    from adapters.notifications.wording import SmsWording
    from adapters.postgres.disputes import PostgresPaymentReferences
    from adapters.postgres.event_store import EventStoreFactory, PooledDatastore
    from adapters.postgres.payouts import PostgresPayoutCandidates
    from adapters.postgres.settlement import PostgresProcessorTransactions

    policy = LedgerPolicy(
        secret_key=settings.hash_key,
        link_lifetime=settings.link_lifetime,
        identity_thresholds_minor=settings.identity_thresholds_minor,
        topic_prefix=settings.topic_prefix,
        public_url=(settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/"),
        risk=settings.risk_policy,
        identity_reuse=timedelta(days=settings.identity_reuse_days),
    )
    owns_pool = isinstance(database, str)
    pool = open_database(database) if isinstance(database, str) else database
    datastore = PooledDatastore(pool, owns_pool=owns_pool)
    extra.setdefault("identity_verifier", DevIdentityVerifier())
    extra.setdefault("wording", SmsWording())
    # Velocity counts live next to the events; authorizations lock per payment; both on the pool.
    extra.setdefault("velocity", PostgresVelocityCounter(datastore))
    extra.setdefault("locks", PostgresAdvisoryLocks(pool, max_holders=LOCK_HOLDERS))
    # Reconciliation: the configured processors' settlement reports, against our side of them.
    extra.setdefault("processor_transactions", PostgresProcessorTransactions(pool))
    # Payouts: the read side's hints (which merchants, which payments); the bank, when configured.
    extra.setdefault("payout_candidates", PostgresPayoutCandidates(pool))
    # Exchange rates for merchants that settle in another currency: the sandbox source (a
    # deployment puts a real provider behind the same port).
    extra.setdefault("fx_rates", SandboxFxRates())
    # Disputes: the payment behind a processor's capture reference.
    extra.setdefault("payment_references", PostgresPaymentReferences(pool))
    # Customers' data keys: personal data in events is sealed under them (application/privacy.py).
    extra.setdefault("customer_keys", build_customer_keys(settings, pool))
    if settings.processors:
        from adapters.processors.settlement import HttpSettlementReports

        extra.setdefault("settlement_reports", HttpSettlementReports(settings.processors))
    if settings.bank_url:
        from adapters.banks.http import HttpBank

        extra.setdefault("bank", HttpBank(settings.bank_url))
    cipher = {}
    if settings.encryption_key:
        cipher = {"CIPHER_TOPIC": "adapters.cipher:KeptKeyAESCipher",
                  "CIPHER_KEY": base64.b64encode(settings.encryption_key).decode()}
    from api.metrics import InstrumentedLedger  # Ledger, with its commands counted (and traced)

    return InstrumentedLedger(
        # The event store: PostgreSQL through our recorder, which writes the outbox rows, SMS and
        # command record of a save with its events; the tables come from migrations/.
        cipher,
        factory=lambda env: EventStoreFactory(env, datastore),
        policy=policy,
        clock=clock or SystemClock(),
        processor=processor or build_processors(settings),
        **extra,
    )


def envelope_opener(settings: Settings) -> EnvelopeOpener:
    """Turn an outbox row's ``envelope`` bytes back into an EventEnvelope (decrypting with the
    same key the ledger encrypted with)."""
    if not settings.encryption_key:
        return EnvelopeOpener()
    from adapters.cipher import KeptKeyAESCipher

    return EnvelopeOpener(KeptKeyAESCipher.from_key(settings.encryption_key).decrypt)


def key_cipher(settings: Settings) -> KeyCipher:
    """What wraps customers' data keys (under ECHOTRANSACT_MASTER_KEY) and unwraps them (under it,
    a previous master key, or, for keys from before 0026, the key once derived from the hash key)."""
    from adapters.personal_data import KeyCipher, MasterKeys

    if settings.master_key is None:
        raise ConfigurationError("ECHOTRANSACT_MASTER_KEY is required (base64, 32 bytes): it wraps customers'"
                                 " data keys; `echotransact run` makes a development one under the data directory")
    return KeyCipher(MasterKeys(settings.master_key, settings.previous_master_keys,
                                legacy_hash_key=settings.hash_key))


def build_customer_keys(settings: Settings, pool: ConnectionPool[Any]) -> PostgresCustomerKeys:
    """Customers' data keys in PostgreSQL: personal data in events is sealed under them."""
    from adapters.postgres.customer_keys import PostgresCustomerKeys

    return PostgresCustomerKeys(pool, key_cipher(settings))


def personal_data_reader(settings: Settings) -> PostgresPersonalDataReader:
    """What opens customers' sealed personal data on the read side (the status projection's masked
    phone, the evidence pack's IP address and free text), with the keys as they are now: destroyed
    ones open to nothing. Given to each projection and read view that needs it, never installed
    process-wide: two ledgers in one process keep their keys apart."""
    from adapters.postgres.customer_keys import PostgresPersonalDataReader

    return PostgresPersonalDataReader(key_cipher(settings))


def build_api_services(settings: Settings, database_url: str, redis_url: str, kafka_bootstrap_servers: str,
                       **ledger_extra: Any) -> ApiServices:
    """Everything the HTTP API needs, connected to the given servers."""
    import redis

    from adapters.postgres.idempotency import IdempotencyStore
    from adapters.postgres.vault import CardVault
    from adapters.redis.rate_limit import RateLimiter
    from api.http.health import Dependencies
    from api.http.services import ApiServices
    from projections.queries import StatusQueries
    from projections.status_cache import AsyncStatusReader, StatusCache
    from projections.views import ReadViews

    client = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    pool = open_database(database_url)
    # The evidence pack opens the page's IP address and free text with this process's keys.
    views = ReadViews(pool, personal=personal_data_reader(settings))
    return ApiServices(
        vault=CardVault(pool, settings.vault_key) if settings.vault_key else None,
        settings=settings,
        ledger=build_ledger(settings, pool, **ledger_extra),
        views=views,
        status=StatusQueries(views, cache=StatusCache(client), loop_cache=AsyncStatusReader(redis_url)),
        idempotency=IdempotencyStore(pool),
        rate_limiter=RateLimiter(client, settings.rate_limit_per_minute),
        redis=client,
        health=Dependencies(database_url, redis_url, kafka_bootstrap_servers),
        pool=pool,
    )


def build_message_dispatcher(settings: Settings, database_url: str, ledger: Ledger) -> MessageDispatcher:
    """The SMS dispatcher: a real provider when ECHOTRANSACT_SMS_URL is set, else the mailbox."""
    from adapters.notifications.sms import DevSmsSender, HttpSmsSender, MessageDispatcher

    sender: Any
    if settings.sms.get("url"):
        missing = [k for k in ("account", "token", "from") if not settings.sms.get(k)]
        if missing:
            raise ConfigurationError(
                "ECHOTRANSACT_SMS_URL needs " + ", ".join(f"ECHOTRANSACT_SMS_{k.upper()}" for k in missing))
        sender = HttpSmsSender(settings.sms["url"], settings.sms["account"], settings.sms["token"],
                               settings.sms["from"])
    else:
        sender = DevSmsSender(database_url)
    cipher = ledger.mapper.cipher

    def on_failed(message_id: UUID, session_id: UUID, reason: str) -> None:
        ledger.record_sms_failure(message_id, session_id, reason)

    def on_sent(sent: list[tuple[UUID, UUID, str]]) -> None:
        ledger.record_sms_sent_many(sent)

    return MessageDispatcher(
        database_url, sender, open_payload=cipher.decrypt if cipher else (lambda payload: payload), on_failed=on_failed,
        on_sent=on_sent,
    )


# -- the long-running processes: each one's object graph, built here and nowhere else -----------


@dataclass(frozen=True)
class ServerUrls:
    database_url: str
    redis_url: str
    kafka_bootstrap_servers: str


Loop = Callable[[threading.Event], None]


def build_relay(settings: Settings, urls: ServerUrls) -> Loop:
    """``echotransact relay``: the outbox to Kafka, until the stop event is set."""
    from adapters.kafka.relay import run_relay

    opener = envelope_opener(settings)

    def run(stop: threading.Event) -> None:
        with observed(settings, "relay", urls.database_url):
            run_relay(urls.database_url, urls.kafka_bootstrap_servers, opener, stop,
                      topic_prefix=settings.topic_prefix)

    return run


def build_worker(settings: Settings, urls: ServerUrls) -> Callable[[], None]:
    """``echotransact worker``: the Faust projection worker (it handles SIGTERM itself)."""
    from adapters.kafka.lag import ConsumerLag
    from adapters.kafka.topics import DEFAULT_PARTITIONS, ensure_topics
    from application.envelope import event_topics
    from projections.registry import all_projections
    from projections.worker import consumer_group, run_worker

    def run() -> None:
        ensure_topics(urls.kafka_bootstrap_servers, settings.topic_prefix)
        lag = ConsumerLag(urls.kafka_bootstrap_servers, consumer_group(settings.topic_prefix),
                          event_topics(settings.topic_prefix), partitions=DEFAULT_PARTITIONS)
        with observed(settings, "worker", urls.database_url, projections=list(all_projections()), collectors=[lag]):
            run_worker(
                database_url=urls.database_url, kafka_bootstrap_servers=urls.kafka_bootstrap_servers,
                redis_url=urls.redis_url, projections=list(all_projections(personal_data_reader(settings)).values()),
                open_envelope=envelope_opener(settings), topic_prefix=settings.topic_prefix,
                catch_up_every_s=settings.catch_up_every_s,
                catch_up_grace=timedelta(seconds=settings.catch_up_grace_s),
            )

    return run


def build_webhooks(settings: Settings, urls: ServerUrls) -> Loop:
    """``echotransact webhooks dispatch``: webhooks and commerce orders, until the stop event is set."""
    from adapters.notifications.webhooks import AttemptResult, Delivery, run_webhooks

    opener = envelope_opener(settings)

    def run(stop: threading.Event) -> None:
        # Built at the first order delivered, not before: at rest this process holds no pool.
        ledgers: list[Ledger] = []
        built = threading.Lock()

        def on_order_delivered(delivery: Delivery, result: AttemptResult) -> None:
            with built:
                if not ledgers:
                    ledgers.append(build_ledger(settings, urls.database_url))
            # A commerce order's idempotency key is its session's id (adapters/notifications/webhooks.py).
            assert delivery.idempotency_key is not None
            ledgers[0].record_order_delivered(UUID(delivery.idempotency_key), result.status_code or 0)

        try:
            with observed(settings, "webhooks", urls.database_url):
                run_webhooks(urls.database_url, opener, settings.hash_key, stop,
                           concurrency=settings.webhook_concurrency,
                           on_order_delivered=on_order_delivered,
                           platform_webhook_url=settings.platform_webhook_url,
                           allow_private_destinations=settings.allow_private_destinations,
                           retry_horizon=timedelta(seconds=settings.webhook_retry_horizon_s),
                           backoff_base=timedelta(seconds=settings.webhook_backoff_base_s),
                           backoff_cap=timedelta(seconds=settings.webhook_backoff_cap_s))
        finally:
            for ledger in ledgers:
                ledger.close()

    return run


def build_dispatch(settings: Settings, urls: ServerUrls) -> Loop:
    """``echotransact dispatch``: the SMS dispatcher in the foreground; beside it the resolver of
    unknown authorizations, the reconciler of the processors' closed days (with processors
    configured), the payouts (with a bank configured), the dispute clock (reminders and expiry)
    and (unless switched off) retention, each on a thread."""
    from adapters.banks.loop import run_payouts
    from adapters.postgres.retention import run_retention
    from adapters.processors.dispute_clock import run_dispute_clock
    from adapters.processors.reconciler import run_reconciler
    from adapters.processors.resolver import run_resolver

    def run(stop: threading.Event) -> None:
        with observed(settings, "dispatch", urls.database_url):
            run_dispatch(stop)

    def run_dispatch(stop: threading.Event) -> None:
        ledger = build_ledger(settings, urls.database_url)
        threads = [threading.Thread(
            target=run_resolver, args=(ledger, urls.database_url, stop), daemon=True, name="resolver",
            kwargs={"every_s": settings.resolve_every_s, "older_than": timedelta(seconds=settings.resolve_after_s)},
        )]
        if settings.processors:
            threads.append(threading.Thread(
                target=run_reconciler, args=(ledger, urls.database_url, list(settings.processors), stop),
                daemon=True, name="reconciler",
                kwargs={"every_s": settings.reconcile_every_s, "delay_days": settings.reconcile_delay_days},
            ))
        threads.append(threading.Thread(
            target=run_dispute_clock, args=(ledger, urls.database_url, stop), daemon=True, name="dispute-clock",
            kwargs={"every_s": DISPUTE_CLOCK_EVERY_S},
        ))
        if settings.bank_url:
            threads.append(threading.Thread(
                target=run_payouts, args=(ledger, stop), daemon=True, name="payouts",
                kwargs={"every_s": settings.payout_every_s},
            ))
        if settings.retention_every_s > 0:
            threads.append(threading.Thread(
                target=run_retention, args=(urls.database_url, stop), daemon=True, name="retention",
                kwargs={"every_s": settings.retention_every_s, "policy": settings.retention_policy},
            ))
        for thread in threads:
            thread.start()
        dispatcher = build_message_dispatcher(settings, urls.database_url, ledger)
        try:
            dispatcher.run(stop)
        finally:
            stop.set()
            for thread in threads:
                thread.join(5)
            dispatcher.close()
            ledger.close()

    return run
