"""The Ledger application: one method per command over the PaymentSession, Payment and
Merchant aggregates, each idempotent given a command id.

Every command goes through ``_execute``: look the command id up in the command log (same
request -> the recorded result; different request -> ``IdempotencyKeyReused``), load, decide,
save the events together with their outbox rows and the command record in one transaction,
and retry on a lost optimistic-concurrency race.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Any, ClassVar
from uuid import NAMESPACE_URL, UUID, uuid5

import msgspec
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError

from application.envelope import AGGREGATE_TYPES, DEFAULT_TOPIC_PREFIX, encode, envelope_for, topic_for
from application.hashing import keyed_hash
from application.errors import (
    ConcurrencyConflict,
    IdempotencyKeyReused,
    NotFound,
    ProcessorRejected,
    ProcessorUnavailable,
)
from application.ports import (
    Clock,
    CommandLog,
    CommandRecord,
    Decision,
    IdentityClaim,
    IdentityVerifier,
    Locks,
    OutboxMessage,
    OutboxSms,
    PaymentProcessor,
    ProcessorRouter,
    SingleProcessor,
    VelocityCounter,
)
from domain.api_key import ApiKey
from domain.customer import Customer
from domain.errors import DomainError
from domain.ledger import FeeSchedule
from domain.merchant import Merchant
from domain.money import CURRENCY_EXPONENTS, Money, check_currency
from domain.payment import Payment, PaymentStatus
from domain.payment_session import PaymentSession, SessionStatus
from domain.risk import DEFAULT_POLICY as DEFAULT_RISK_POLICY
from domain.risk import RiskPolicy
from domain.risk import assess as assess_risk

API_KEY_PREFIX = "et"

# Above these amounts (major units) a customer must pass an identity check. USD 100.00 is the
# product's rule; the others are set near that value and are configuration, not law.
DEFAULT_IDENTITY_THRESHOLDS_MAJOR: Mapping[str, int] = MappingProxyType(
    {"USD": 100, "EUR": 100, "GBP": 80, "CAD": 135, "AUD": 150, "NZD": 165, "CHF": 90,
     "SEK": 1_000, "NOK": 1_000, "DKK": 700, "MXN": 1_700, "INR": 8_300, "SGD": 135,
     "JPY": 15_000, "KRW": 135_000, "KWD": 30, "BHD": 38}
)

_MAX_SAVE_ATTEMPTS = 8
_canonical = msgspec.json.Encoder(order="sorted")
_COMMAND_NAMESPACE = uuid5(NAMESPACE_URL, "https://echotransact.example/commands")
_CUSTOMER_NAMESPACE = uuid5(NAMESPACE_URL, "https://echotransact.example/customers")


def default_identity_thresholds_minor() -> dict[str, int]:
    return {
        currency: DEFAULT_IDENTITY_THRESHOLDS_MAJOR.get(currency, 100) * 10**exp
        for currency, exp in CURRENCY_EXPONENTS.items()
    }


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


@dataclass(frozen=True)
class LinkIssued:
    """Returned only in memory to the caller that delivers the SMS; never stored in plain text."""

    result: CommandResult
    link_token: str
    code: str


Decide = Callable[[], tuple[Sequence[Aggregate], dict[str, Any]]]


class Ledger(Application):
    name = "Ledger"
    env: ClassVar[dict[str, str]] = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "APPLICATION_RECORDER_TOPIC": "adapters.postgres.event_store:OutboxRecorder",
        "CREATE_TABLE": "no",  # tables come from migrations/
        "ORIGINATOR_ID_TYPE": "uuid",
    }
    snapshotting_intervals: ClassVar[dict[type[Aggregate], int]] = {
        PaymentSession: 20,
        Payment: 20,
        Merchant: 50,
        ApiKey: 50,
        Customer: 50,
    }

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        policy: LedgerPolicy,
        clock: Clock,
        processor: PaymentProcessor | ProcessorRouter,
        identity_verifier: IdentityVerifier | None = None,
        velocity: VelocityCounter | None = None,
        locks: Locks | None = None,
    ) -> None:
        super().__init__(env)
        # Per-payment authorization locks across processes (api/bootstrap.py supplies them);
        # a Ledger built without them does not serialize authorizations of one payment.
        self.locks = locks
        # The composition root supplies it (api/bootstrap.py: in the event store's database).
        self.velocity = velocity
        self.policy = policy
        self.clock = clock
        self.processors: ProcessorRouter = (
            processor if hasattr(processor, "select") else SingleProcessor(processor)  # type: ignore[arg-type]
        )
        self.identity_verifier = identity_verifier
        self._merchants_read: dict[UUID, Merchant] = {}
        self._merchants_read_lock = threading.Lock()

    def close(self) -> None:
        close_locks = getattr(self.locks, "close", None)
        if close_locks is not None:
            close_locks()
        super().close()

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def command_log(self) -> CommandLog:
        return self.recorder  # type: ignore[return-value]

    def _record(self, processing_event: Any) -> Any:
        """Add one outbox row per event, so the recorder writes both in one transaction."""
        outbox = []
        for event in processing_event.events:
            aggregate = processing_event.aggregates[event.originator_id]
            aggregate_type = AGGREGATE_TYPES[type(aggregate)]
            merchant_id = aggregate.id if isinstance(aggregate, Merchant) else aggregate.merchant_id
            envelope = envelope_for(event, aggregate_type, merchant_id)
            payload = encode(envelope)
            if self.mapper.compressor:
                payload = self.mapper.compressor.compress(payload)
            if self.mapper.cipher:
                payload = self.mapper.cipher.encrypt(payload)
            outbox.append(
                OutboxMessage(
                    event_id=envelope.event_id,
                    aggregate_id=event.originator_id,
                    version=event.originator_version,
                    topic=topic_for(aggregate_type, self.policy.topic_prefix),
                    key=str(event.originator_id),
                    envelope=payload,
                )
            )
        processing_event.saved_kwargs["outbox"] = outbox
        processing_event.saved_kwargs["vault_attachments"] = [
            (event.card_token, event.payment_id) for event in processing_event.events
            if isinstance(event, PaymentSession.PaymentMethodAttached)
        ]
        return super()._record(processing_event)

    def keyed_hash(self, purpose: str, *parts: object) -> str:
        return keyed_hash(self.policy.secret_key, purpose, *parts)

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

    def _derived_id(self, command_id: str, kind: str) -> UUID:
        return uuid5(_COMMAND_NAMESPACE, f"{kind}:{command_id}")

    def _get(self, cls: type[Any], aggregate_id: UUID, merchant_id: UUID | None = None) -> Any:
        """Load an aggregate; another merchant's aggregate is as missing as a missing one."""
        try:
            aggregate = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            aggregate = None
        if (
            not isinstance(aggregate, cls)
            or (merchant_id is not None and getattr(aggregate, "merchant_id", None) != merchant_id)
        ):
            raise NotFound(f"no {AGGREGATE_TYPES[cls].replace('_', ' ')} {aggregate_id}")
        return aggregate

    def get_session(self, session_id: UUID, merchant_id: UUID | None = None) -> PaymentSession:
        return self._get(PaymentSession, session_id, merchant_id)

    def get_payment(self, payment_id: UUID, merchant_id: UUID | None = None) -> Payment:
        return self._get(Payment, payment_id, merchant_id)

    def get_merchant(self, merchant_id: UUID) -> Merchant:
        return self._get(Merchant, merchant_id)

    def _merchant_to_read(self, merchant_id: UUID) -> Merchant:
        """The merchant as it is now, for reading only: a command that changes a merchant loads
        it with ``get_merchant``. Kept in memory and checked with one query for newer events;
        a newer merchant replaces the kept one, which is never changed, so threads share it."""
        kept = self._merchants_read.get(merchant_id)
        if kept is not None and not self.recorder.select_events(merchant_id, gt=kept.version, limit=1):
            return kept
        merchant = self.get_merchant(merchant_id)
        with self._merchants_read_lock:
            if len(self._merchants_read) >= 10_000:
                self._merchants_read.clear()
            self._merchants_read[merchant_id] = merchant
        return merchant

    # -- merchants -----------------------------------------------------------------------------

    def register_merchant(
        self,
        command_id: str,
        *,
        name: str,
        fee_percent_bps: int = 290,
        fee_fixed_minor: int = 30,
        webhook_url: str | None = None,
        commerce_backend_uri: str | None = None,
        max_amount_minor: Mapping[str, int] | None = None,
    ) -> CommandResult:
        merchant_id = self._derived_id(command_id, "merchant")
        request = {
            "name": name, "fee_percent_bps": fee_percent_bps, "fee_fixed_minor": fee_fixed_minor,
            "webhook_url": webhook_url, "commerce_backend_uri": commerce_backend_uri,
            "max_amount_minor": dict(max_amount_minor or {}),
        }

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            merchant = Merchant.register(
                merchant_id,
                name=name,
                fee_schedule=FeeSchedule(fee_percent_bps, fee_fixed_minor),
                webhook_url=webhook_url,
                commerce_backend_uri=commerce_backend_uri,
                max_amount_minor=max_amount_minor,
            )
            return [merchant], {"merchant_id": str(merchant_id)}

        return self._execute(command_id, "register_merchant", request, merchant_id, decide)

    def change_merchant_settings(
        self, command_id: str, merchant_id: UUID, **changes: Any
    ) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            merchant = self.get_merchant(merchant_id)
            fees = None
            if "fee_percent_bps" in changes or "fee_fixed_minor" in changes:
                fees = FeeSchedule(
                    changes.get("fee_percent_bps", merchant.fee_percent_bps),
                    changes.get("fee_fixed_minor", merchant.fee_fixed_minor),
                )
            merchant.change_settings(
                name=changes.get("name"),
                fee_schedule=fees,
                webhook_url=changes.get("webhook_url"),
                commerce_backend_uri=changes.get("commerce_backend_uri"),
                max_amount_minor=changes.get("max_amount_minor"),
            )
            return [merchant], {"merchant_id": str(merchant_id)}

        return self._execute(
            command_id, "change_merchant_settings", {"merchant_id": str(merchant_id), **changes},
            merchant_id, decide,
        )

    # -- API keys ------------------------------------------------------------------------------

    def issue_api_key(
        self, command_id: str, *, role: str, merchant_id: UUID | None = None, label: str = ""
    ) -> tuple[CommandResult, str]:
        """Issue a key; returns the result and the key itself, which is never stored and so is
        shown only by this call (a replay of the same command returns an empty key)."""
        key_id = self._derived_id(command_id, "api_key")
        secret = secrets.token_urlsafe(32)

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            if merchant_id is not None:
                merchant = self.get_merchant(merchant_id)
                if not merchant.active:
                    raise NotFound(f"no merchant {merchant_id}")
            key = ApiKey.issue(
                key_id, role=role, merchant_id=merchant_id,
                key_hash=self.keyed_hash("api_key", key_id, secret), label=label,
            )
            return [key], {"key_id": str(key_id), "role": role,
                           "merchant_id": str(merchant_id) if merchant_id else None}

        request = {"role": role, "merchant_id": str(merchant_id) if merchant_id else None, "label": label}
        result = self._execute(command_id, "issue_api_key", request, key_id, decide)
        token = "" if result.replayed else f"{API_KEY_PREFIX}_{key_id.hex}_{secret}"
        return result, token

    def revoke_api_key(self, command_id: str, key_id: UUID, *, reason: str) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            key = self._get(ApiKey, key_id)
            key.revoke(reason)
            return [key], {"key_id": str(key_id), "revoked": True}

        return self._execute(command_id, "revoke_api_key", {"key_id": str(key_id), "reason": reason},
                             key_id, decide)

    def authenticate(self, token: str) -> ApiKey | None:
        """The live key this token names, or None (malformed, unknown, revoked or wrong secret)."""
        prefix, _, rest = token.partition("_")
        key_hex, _, secret = rest.partition("_")
        if prefix != API_KEY_PREFIX or len(key_hex) != 32 or not secret:
            return None
        try:
            key_id = UUID(hex=key_hex)
            key = self._get(ApiKey, key_id)
        except (ValueError, NotFound):
            return None
        if key.revoked or not hmac.compare_digest(key.key_hash, self.keyed_hash("api_key", key_id, secret)):
            return None
        return key

    # -- the payment session -------------------------------------------------------------------

    def open_session(self, command_id: str, **fields: Any) -> CommandResult:
        """Open a payment session (the fields of ``_open_session``); the link is sent apart."""
        return self._open_session(command_id, send_link=False, **fields).result

    def open_session_and_send_link(self, command_id: str, **fields: Any) -> LinkIssued:
        """Open a payment session and text the customer its link and code, in one save."""
        return self._open_session(command_id, send_link=True, **fields)

    def _open_session(
        self,
        command_id: str,
        *,
        send_link: bool,
        merchant_id: UUID,
        amount_minor: int,
        currency: str,
        customer_phone: str,
        order_reference: str,
        line_items: Sequence[Mapping[str, Any]],
        voice_platform: str,
        conversation_id: str,
        callback_url: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> LinkIssued:
        """Open a payment session; with ``send_link``, also issue the link and code and queue
        the SMS that carries them, in the same save (one transaction, one command record).

        Both forms are the same command (name and request hash): a retry of a request that an
        earlier version opened, but did not text, sends the link now."""
        session_id = self._derived_id(command_id, "payment_session")
        request = {
            "merchant_id": str(merchant_id), "amount_minor": amount_minor, "currency": currency,
            "customer_phone": customer_phone, "order_reference": order_reference,
            "line_items": [dict(item) for item in line_items], "voice_platform": voice_platform,
            "conversation_id": conversation_id, "callback_url": callback_url,
            "metadata": dict(metadata or {}),
        }
        issued: dict[str, str] = {}
        sms: list[OutboxSms] = []

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            merchant = self._merchant_to_read(merchant_id)
            check_currency(currency)
            session = PaymentSession.open(
                session_id,
                merchant_id=merchant_id,
                amount_minor=amount_minor,
                currency=currency,
                customer_phone=customer_phone,
                order_reference=order_reference,
                line_items=line_items,
                voice_platform=voice_platform,
                conversation_id=conversation_id,
                callback_url=callback_url,
                identity_threshold_minor=self.policy.identity_threshold_minor(currency),
                expires_at=self.clock.now() + self.policy.link_lifetime,
                metadata=metadata,
            )
            merchant.check_can_accept(amount_minor, currency)
            if session.identity_required:
                customer = self._find_customer(customer_phone)
                if customer is not None and customer.identity_on_file(self.clock.now(), self.policy.identity_reuse):
                    assert customer.identity_verified_at is not None
                    session.recognize_identity(customer.id, customer.identity_verified_at)
            if send_link:
                issued["token"], issued["code"] = self._issue_link(session)
                text = self._sms_text(session, merchant, issued["token"], issued["code"])
                sms[:] = [self._sms(f"{command_id}:send_link", session, text)]
            return [session], _session_result(session)

        result = self._execute(command_id, "open_session", request, session_id, decide,
                               messages=lambda: sms, creates=True)
        if not send_link or not result.replayed:
            return LinkIssued(result, issued.get("token", ""), issued.get("code", ""))
        if self.get_session(session_id).status == SessionStatus.AWAITING_CUSTOMER:
            # Opened by an earlier version, which sent the link as a second command.
            return self.send_link(f"{command_id}:send_link", session_id)
        return LinkIssued(result, "", "")

    def _session_command(
        self,
        command_id: str,
        name: str,
        session_id: UUID,
        request: Mapping[str, Any],
        act: Callable[[PaymentSession], None],
        merchant_id: UUID | None = None,
    ) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            session = self.get_session(session_id, merchant_id)
            act(session)
            return [session], _session_result(session)

        return self._execute(
            command_id, name, {"session_id": str(session_id), **request}, session_id, decide
        )

    def _sms(self, command_id: str, session: PaymentSession, body: str) -> OutboxSms:
        payload = _canonical.encode({"to": session.customer_phone, "body": body})
        if self.mapper.cipher:
            payload = self.mapper.cipher.encrypt(payload)
        return OutboxSms(self._derived_id(command_id, "sms"), session.id, payload)

    def _sms_text(self, session: PaymentSession, merchant: Merchant, token: str, code: str) -> str:
        amount = Money(session.amount_minor, session.currency).format()
        minutes = max(1, round((session.expires_at - self.clock.now()).total_seconds() / 60))
        return (f"{merchant.name}: pay {amount} for order {session.order_reference} at "
                f"{self.policy.public_url}/pay/{token} - your code is {code}. "
                f"The link expires in {minutes} min. Never share this code.")

    def _issue_link(self, session: PaymentSession) -> tuple[str, str]:
        """A single-use link token and a one-time code; the session records only their keyed
        hashes. The token starts with the session id, so the page finds the session; the rest
        is the unguessable secret."""
        token = session.id.hex + secrets.token_urlsafe(32)
        code = f"{secrets.randbelow(10**6):06d}"
        session.send_link(self.keyed_hash("link", token), self.keyed_hash("code", session.id, code),
                          self.clock.now())
        return token, code

    def send_link(self, command_id: str, session_id: UUID) -> LinkIssued:
        """Issue the link and code, and queue the SMS that carries them in the same transaction.
        Only keyed hashes are recorded in the event; the SMS payload is encrypted. A replay of
        the same command cannot show them again."""
        issued: dict[str, str] = {}
        sms: list[OutboxSms] = []

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            session = self.get_session(session_id)
            issued["token"], issued["code"] = self._issue_link(session)
            text = self._sms_text(session, self._merchant_to_read(session.merchant_id),
                                  issued["token"], issued["code"])
            sms[:] = [self._sms(command_id, session, text)]
            return [session], _session_result(session)

        result = self._execute(command_id, "send_link", {"session_id": str(session_id)}, session_id,
                               decide, messages=lambda: sms)
        if result.replayed:
            return LinkIssued(result, "", "")
        return LinkIssued(result, issued["token"], issued["code"])

    def session_for_link(self, link_token: str) -> PaymentSession:
        """The session a payment link belongs to; NotFound for anything else, malformed or not."""
        try:
            session_id = UUID(hex=link_token[:32])
            session = self.get_session(session_id)
        except (ValueError, NotFound):
            raise NotFound("this payment link is not valid") from None
        if not session.link_token_matches(self.keyed_hash("link", link_token)):
            raise NotFound("this payment link is not valid")
        return session

    def open_link(self, command_id: str, session_id: UUID, link_token: str) -> CommandResult:
        def act(session: PaymentSession) -> None:
            if not session.link_token_matches(self.keyed_hash("link", link_token)):
                raise NotFound(f"no payment session {session_id}")
            session.open_link(self.clock.now())

        return self._session_command(command_id, "open_link", session_id, {}, act)

    def resend_code(self, command_id: str, session_id: UUID) -> LinkIssued:
        """A new code by SMS (the link stays the same; attempts are not reset)."""
        code = f"{secrets.randbelow(10**6):06d}"
        loaded: dict[str, PaymentSession] = {}

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            session = loaded["session"] = self.get_session(session_id)
            session.resend_code(self.keyed_hash("code", session_id, code), self.clock.now())
            return [session], _session_result(session)

        def sms() -> list[OutboxSms]:
            session = loaded["session"]
            merchant = self._merchant_to_read(session.merchant_id)
            return [self._sms(command_id, session,
                              f"{merchant.name}: your new code is {code}. Never share this code.")]

        result = self._execute(command_id, "resend_code", {"session_id": str(session_id)}, session_id,
                               decide, messages=sms)
        return LinkIssued(result, "", "" if result.replayed else code)

    def record_sms_failure(self, message_id: UUID, session_id: UUID, reason: str) -> CommandResult:
        return self._session_command(
            f"sms_failed:{message_id}", "record_sms_failure", session_id, {"reason": reason},
            lambda s: s.record_sms_failure(reason),
        )

    def verify_code(self, command_id: str, session_id: UUID, code: str) -> CommandResult:
        """A wrong code is saved (it counts toward the lock) and reported in the result."""
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            session = self.get_session(session_id)
            check = session.verify_code(self.keyed_hash("code", session_id, code), self.clock.now())
            return [session], {
                **_session_result(session),
                "code_check": check.value,
                "attempts_left": session.code_attempts_left,
            }

        # The code itself goes into the request hash only through the keyed hash.
        request = {"session_id": str(session_id), "code": self.keyed_hash("code", session_id, code)}
        return self._execute(command_id, "verify_code", request, session_id, decide)

    def verify_identity(self, command_id: str, session_id: UUID, claim: IdentityClaim) -> CommandResult:
        """Ask the verifier; a pass is also remembered on the customer, so later purchases by the
        same phone skip the check (``policy.identity_reuse``)."""
        if self.identity_verifier is None:
            raise ProcessorUnavailable("no identity verifier is configured")
        verifier = self.identity_verifier

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            session = self.get_session(session_id)
            outcome = verifier.verify(phone=session.customer_phone, claim=claim)
            now = self.clock.now()
            session.record_identity_check(
                verified=outcome.verified, verifier=outcome.verifier, reason=outcome.reason, now=now,
            )
            changed: list[Aggregate] = [session]
            if outcome.verified:
                customer = self._find_customer(session.customer_phone) or Customer.register(
                    self._customer_id(session.customer_phone))
                customer.record_identity_verified(verifier=outcome.verifier, session_id=session_id, now=now)
                changed.append(customer)
            return changed, _session_result(session)

        request = {"session_id": str(session_id),
                   "claim": self.keyed_hash("identity", claim.date_of_birth, claim.postal_code)}
        return self._execute(command_id, "verify_identity", request, session_id, decide)

    def _customer_id(self, phone: str) -> UUID:
        return uuid5(_CUSTOMER_NAMESPACE, self.keyed_hash("customer", phone))

    def _find_customer(self, phone: str) -> Customer | None:
        try:
            customer: Customer = self.repository.get(self._customer_id(phone))
        except AggregateNotFoundError:
            return None
        return customer

    def attach_payment_method(
        self, command_id: str, session_id: UUID, *, card_token: str, card_brand: str, card_last4: str,
        card_fingerprint: str | None = None,
    ) -> CommandResult:
        """Attach the tokenized card and create the Payment, atomically."""
        payment_id = self._derived_id(command_id, "payment")

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            session = self.get_session(session_id)
            merchant = self._merchant_to_read(session.merchant_id)
            session.attach_payment_method(
                payment_id=payment_id, card_token=card_token, card_brand=card_brand,
                card_last4=card_last4, now=self.clock.now(),
            )
            payment = Payment.initiate(
                payment_id,
                merchant_id=session.merchant_id,
                session_id=session.id,
                amount_minor=session.amount_minor,
                currency=session.currency,
                card_token=card_token,
                card_brand=card_brand,
                card_last4=card_last4,
                fee_schedule=merchant.fee_schedule,
                card_fingerprint=card_fingerprint,
            )
            return [session, payment], {**_session_result(session), "payment_id": str(payment_id)}

        request = {"session_id": str(session_id), "card_token": card_token, "card_brand": card_brand,
                   "card_last4": card_last4}
        if card_fingerprint is not None:  # absent, the request hashes as before fingerprints existed
            request["card_fingerprint"] = card_fingerprint
        return self._execute(command_id, "attach_payment_method", request, session_id, decide)

    def cancel_session(
        self, command_id: str, session_id: UUID, *, reason: str = "cancelled_by_merchant",
        merchant_id: UUID | None = None,
    ) -> CommandResult:
        return self._session_command(
            command_id, "cancel_session", session_id, {"reason": reason},
            lambda s: s.cancel(reason), merchant_id,
        )

    def expire_session(self, session_id: UUID) -> CommandResult:
        return self._session_command(
            f"expire_session:{session_id}", "expire_session", session_id, {},
            lambda s: s.expire(self.clock.now()),
        )

    # -- the payment ---------------------------------------------------------------------------

    def _processor_of(self, payment: Payment) -> PaymentProcessor:
        assert payment.processor is not None, "only a payment sent for authorization has a processor"
        return self.processors.named(payment.processor)

    def authorize_payment(self, payment_id: UUID, *, cvv: str | None = None) -> CommandResult:
        """Send the payment for authorization and record the processor's answer.

        Three steps, so a crash anywhere is safe: (1) record ProcessingStarted; (2) ask the
        processor with an idempotency key derived from the payment, so asking again never
        charges twice; (3) record the outcome on the payment and its session together. An
        unknown outcome (timeout) records nothing and is settled by ``resolve_authorization``.
        """
        with self._authorization_lock(payment_id):
            return self._authorize(payment_id, cvv)

    def _authorization_lock(self, payment_id: UUID) -> AbstractContextManager[None]:
        return self.locks.hold(f"authorize:{payment_id}") if self.locks is not None else nullcontext()

    def _authorize(self, payment_id: UUID, cvv: str | None) -> CommandResult:
        payment = self.get_payment(payment_id)
        started_here = False
        if payment.status == PaymentStatus.INITIATED:
            started = self._execute(
                f"authorize:{payment_id}:start", "start_processing", {"payment_id": str(payment_id)},
                payment_id, lambda: self._start_processing(payment_id),
            )
            started_here = not started.replayed
            payment = self.get_payment(payment_id)
        if payment.status != PaymentStatus.PROCESSING:
            return CommandResult(_payment_result(payment), None, replayed=True)
        request = {
            "idempotency_key": f"authorize:{payment_id}", "amount_minor": payment.amount_minor,
            "currency": payment.currency, "card_token": payment.card_token, "card_last4": payment.card_last4,
            "merchant_id": str(payment.merchant_id), "cvv": cvv,
        }
        outcome = self._processor_of(payment).authorize(**request)
        if outcome.decision == Decision.UNKNOWN and not outcome.sent and started_here:
            # The chosen processor went down between the choice and the call, and provably got
            # nothing: failover now instead of leaving the customer waiting for it to return.
            # Only the call that started processing may do this, so no earlier call to the
            # first processor can be in flight with the same key.
            other = self.processors.alternative(payment.processor or "")
            if other is not None:
                self._execute(
                    f"authorize:{payment_id}:reroute", "reroute_processing",
                    {"payment_id": str(payment_id), "processor": other.name}, payment_id,
                    lambda: self._reroute(payment_id, other.name),
                )
                outcome = other.authorize(**request)
        return self._record_authorization(payment_id, outcome)

    def _reroute(self, payment_id: UUID, processor: str) -> tuple[Sequence[Aggregate], dict[str, Any]]:
        payment = self.get_payment(payment_id)
        payment.reroute(processor)
        return [payment], _payment_result(payment)

    def resolve_authorization(self, payment_id: UUID) -> CommandResult:
        """Settle an authorization whose outcome was unknown by asking, never by charging again."""
        with self._authorization_lock(payment_id):
            payment = self.get_payment(payment_id)
            if payment.status != PaymentStatus.PROCESSING:
                return CommandResult(_payment_result(payment), None, replayed=True)
            outcome = self._processor_of(payment).status(idempotency_key=f"authorize:{payment_id}")
            if outcome is None:
                # The processor never received it: asking with the same key is safe.
                return self._authorize(payment_id, None)
            return self._record_authorization(payment_id, outcome)

    def _start_processing(self, payment_id: UUID) -> tuple[Sequence[Aggregate], dict[str, Any]]:
        """The risk rules, then (unless they decline) the processor is chosen and recorded."""
        payment = self.get_payment(payment_id)
        session = self.get_session(payment.session_id) if payment.session_id else None
        changed: list[Aggregate] = [payment]
        if payment.risk_decision is None:
            self._assess_risk(payment, session)
            if payment.status == PaymentStatus.FAILED:
                if session is not None:
                    session.record_decline(payment_id, "risk_declined")
                    changed.append(session)
                return changed, _payment_result(payment)
        # Failover happens here, before anything is sent: the chosen processor is recorded, and
        # every later call about this payment goes to it.
        payment.start_processing(self.processors.select().name)
        return changed, _payment_result(payment)

    def _assess_risk(self, payment: Payment, session: PaymentSession | None) -> None:
        if self.velocity is None:
            raise ProcessorUnavailable("no velocity counter is configured; risk rules cannot run")
        policy = self.policy.risk
        keys = {"card": self.keyed_hash("velocity", "card", payment.card_fingerprint or payment.card_token)}
        if session is not None:
            keys["phone"] = self.keyed_hash("velocity", "phone", session.customer_phone)
        counts = self.velocity.record_and_count(
            str(payment.id), self.clock.now(), policy.velocity_window_minutes * 60, keys
        )
        recent_by_phone, recent_by_card = counts.get("phone", 1), counts["card"]
        prior_declines = session.declines if session is not None else 0
        merchant = self._merchant_to_read(payment.merchant_id)
        verdict = assess_risk(
            payment.amount_minor, payment.currency, merchant.max_amount_minor.get(payment.currency),
            recent_by_phone, recent_by_card, prior_declines=prior_declines,
            large_amount_minor=self.policy.identity_thresholds_minor.get(payment.currency),
            policy=policy,
        )
        payment.assess_risk(verdict, recent_by_phone=recent_by_phone, recent_by_card=recent_by_card,
                            prior_declines=prior_declines)

    def _record_authorization(self, payment_id: UUID, outcome: Any) -> CommandResult:
        if outcome.decision == Decision.UNKNOWN:
            raise ProcessorUnavailable(
                "the processor did not answer; the authorization will be resolved by asking it"
            )

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id)
            changed: list[Aggregate] = [payment]
            session = self.get_session(payment.session_id) if payment.session_id else None
            if outcome.decision == Decision.APPROVED:
                payment.authorize(
                    processor=outcome.processor,
                    processor_reference=outcome.reference,
                    amount_minor=outcome.amount_minor or payment.amount_minor,
                    expires_at=outcome.expires_at
                    or self.clock.now() + self.policy.authorization_lifetime,
                )
                if session is not None:
                    session.complete(payment_id)
            else:
                payment.fail(outcome.reason_code or "declined", outcome.message)
                if session is not None:
                    session.record_decline(payment_id, outcome.reason_code or "declined")
            if session is not None:
                changed.append(session)
            return changed, _payment_result(payment)

        return self._execute(
            f"authorize:{payment_id}:outcome", "record_authorization",
            {"payment_id": str(payment_id), "decision": outcome.decision.value,
             "reference": outcome.reference},
            payment_id, decide,
        )

    def capture_payment(
        self, command_id: str, payment_id: UUID, *, amount_minor: int | None = None,
        merchant_id: UUID | None = None,
    ) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id, merchant_id)
            amount = payment.check_capture(amount_minor, self.clock.now())
            assert payment.authorization_reference is not None
            outcome = self._processor_of(payment).capture(
                idempotency_key=f"capture:{payment_id}",
                authorization_reference=payment.authorization_reference,
                amount_minor=amount,
                currency=payment.currency,
            )
            _require_approved(outcome, "capture")
            payment.capture(amount_minor=amount, processor_reference=outcome.reference, now=self.clock.now())
            return [payment], _payment_result(payment)

        request = {"payment_id": str(payment_id), "amount_minor": amount_minor}
        return self._execute(command_id, "capture_payment", request, payment_id, decide)

    def void_payment(
        self, command_id: str, payment_id: UUID, *, reason: str = "requested_by_merchant",
        merchant_id: UUID | None = None,
    ) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id, merchant_id)
            if payment.status != PaymentStatus.AUTHORIZED:
                payment.void(reason)  # raises the named InvalidTransition
            assert payment.authorization_reference is not None
            outcome = self._processor_of(payment).void(
                idempotency_key=f"void:{payment_id}",
                authorization_reference=payment.authorization_reference,
            )
            _require_approved(outcome, "void")
            payment.void(reason)
            return [payment], _payment_result(payment)

        request = {"payment_id": str(payment_id), "reason": reason}
        return self._execute(command_id, "void_payment", request, payment_id, decide)

    def refund_payment(
        self, command_id: str, payment_id: UUID, *, amount_minor: int, reason: str = "",
        merchant_id: UUID | None = None,
    ) -> CommandResult:
        refund_id = self._derived_id(command_id, "refund").hex

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id, merchant_id)
            payment.check_refund(amount_minor)
            assert payment.authorization_reference is not None
            outcome = self._processor_of(payment).refund(
                idempotency_key=f"refund:{refund_id}",
                authorization_reference=payment.authorization_reference,
                amount_minor=amount_minor,
                currency=payment.currency,
            )
            _require_approved(outcome, "refund")
            payment.refund(
                refund_id=refund_id, amount_minor=amount_minor, reason=reason,
                processor_reference=outcome.reference,
            )
            return [payment], {**_payment_result(payment), "refund_id": refund_id}

        request = {"payment_id": str(payment_id), "amount_minor": amount_minor, "reason": reason}
        return self._execute(command_id, "refund_payment", request, payment_id, decide)

    def expire_authorization(self, payment_id: UUID) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id)
            payment.expire_authorization(self.clock.now())
            return [payment], _payment_result(payment)

        return self._execute(
            f"expire_authorization:{payment_id}", "expire_authorization",
            {"payment_id": str(payment_id)}, payment_id, decide,
        )

    def settle_payment(self, payment_id: UUID, settlement_reference: str) -> CommandResult:
        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            payment = self.get_payment(payment_id)
            payment.settle(settlement_reference)
            return [payment], _payment_result(payment)

        return self._execute(
            f"settle:{payment_id}", "settle_payment",
            {"payment_id": str(payment_id), "settlement_reference": settlement_reference},
            payment_id, decide,
        )


def _require_approved(outcome: Any, action: str) -> None:
    if outcome.decision == Decision.UNKNOWN:
        raise ProcessorUnavailable(f"the processor did not answer the {action}; retry the request")
    if outcome.decision != Decision.APPROVED:
        raise ProcessorRejected(
            f"the processor refused the {action}: {outcome.reason_code} {outcome.message}".strip(),
            reason_code=outcome.reason_code,
        )


def _session_result(session: PaymentSession) -> dict[str, Any]:
    return {"session_id": str(session.id), "status": session.status, "version": session.version}


def _payment_result(payment: Payment) -> dict[str, Any]:
    return {"payment_id": str(payment.id), "status": payment.status, "version": payment.version}
