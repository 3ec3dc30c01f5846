"""Use cases of the payment session, the customer's journey: open it (and text the link), send or
resend the link and code, open the link, verify the code and the identity, attach the card
(which creates the payment), cancel, expire, and record an SMS the provider gave up on."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.domain import Aggregate

from application.errors import NotFound, ProcessorUnavailable
from application.ports import IdentityClaim, IdentityVerifier, MessageWording, OutboxSms
from application.privacy import CustomerKey, PrivacyCommands
from application.unit_of_work import CommandResult, LinkIssued
from domain.customer import Customer
from domain.errors import InvalidSplit
from domain.ledger import PLATFORM_PARTY, Split
from domain.merchant import Merchant
from domain.money import Money, check_currency
from domain.payment import Payment
from domain.payment_session import PaymentSession, SessionStatus
from domain.values import check_phone

_sms_json = msgspec.json.Encoder(order="sorted")


class SessionCommands(PrivacyCommands):
    # Given by the composition root (through Ledger's constructor).
    wording: MessageWording
    identity_verifier: IdentityVerifier | None

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
        splits: Sequence[Split] = (),
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
        if splits:  # only then: the request hash of sessions without splits stays what it was
            request["splits"] = [s.as_dict() for s in splits]
        issued: dict[str, str] = {}
        sms: list[OutboxSms] = []

        key: list[CustomerKey] = []

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            merchant = self.merchant_to_read(merchant_id)
            check_currency(currency)
            if not key:  # the customer's data key (made on their first session), once per command
                # The session is saved after this, sealed under the key: its save makes the key and
                # the link durable.
                key.append(self._customer_key(check_phone(customer_phone), session_id, saved_after=True))
            session = PaymentSession.open(
                session_id,
                merchant_id=merchant_id,
                amount_minor=amount_minor,
                currency=currency,
                customer_phone=customer_phone,
                customer_id=key[0].customer_id,
                seal=self._sealer(key[0]),
                order_reference=order_reference,
                line_items=line_items,
                voice_platform=voice_platform,
                conversation_id=conversation_id,
                callback_url=callback_url,
                identity_threshold_minor=self.policy.identity_threshold_minor(currency),
                expires_at=self.clock.now() + self.policy.link_lifetime,
                metadata=metadata,
                splits=splits,
            )
            merchant.check_can_accept(amount_minor, currency)
            self._check_partners(splits)
            if session.identity_required:
                customer = self._customer_on_file(key[0].customer_id, customer_phone)
                if customer is not None:
                    assert customer.identity_verified_at is not None
                    session.recognize_identity(customer.id, customer.identity_verified_at)
            if send_link:
                issued["token"], issued["code"] = self._issue_link(session)
                text = self._link_text(session, merchant, issued["token"], issued["code"])
                sms[:] = [self._sms(f"{command_id}:send_link", session, text, phone=customer_phone)]
            return [session], _session_result(session)

        result = self._execute(command_id, "open_session", request, session_id, decide,
                               messages=lambda: sms, creates=True)
        if not send_link or not result.replayed:
            return LinkIssued(result, issued.get("token", ""), issued.get("code", ""))
        if self.get_session(session_id).status == SessionStatus.AWAITING_CUSTOMER:
            # Opened by an earlier version, which sent the link as a second command.
            return self.send_link(f"{command_id}:send_link", session_id)
        return LinkIssued(result, "", "")

    def _check_partners(self, splits: Sequence[Split]) -> None:
        """Every partner a split names is a merchant of ours that takes payments."""
        for split in splits:
            if split.party == PLATFORM_PARTY:
                continue
            try:
                partner = self.merchant_to_read(UUID(split.party))
            except (ValueError, NotFound):
                raise InvalidSplit(f"split party {split.party!r} is neither 'platform' nor a merchant of ours") \
                    from None
            if not partner.active:
                raise InvalidSplit(f"split party {split.party} is a deactivated merchant")

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

    def _sms(self, command_id: str, session: PaymentSession, body: str, *, phone: str | None = None) -> OutboxSms:
        """The SMS to queue (encrypted like the events; deleted when the customer is erased)."""
        phone = phone or self.session_phone(session)
        if phone is None:
            raise NotFound(f"payment session {session.id} has no customer any more (erased)")
        payload = _sms_json.encode({"to": phone, "body": body})
        if self.mapper.cipher:
            payload = self.mapper.cipher.encrypt(payload)
        return OutboxSms(self._derived_id(command_id, "sms"), session.id, payload)

    def _link_text(self, session: PaymentSession, merchant: Merchant, token: str, code: str) -> str:
        return self.wording.payment_link(
            merchant_name=merchant.name,
            amount=Money(session.amount_minor, session.currency),
            order_reference=session.order_reference,
            link_url=f"{self.policy.public_url}/pay/{token}",
            code=code,
            expires_in=session.expires_at - self.clock.now(),
        )

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
            text = self._link_text(session, self.merchant_to_read(session.merchant_id),
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

    def open_link(self, command_id: str, session_id: UUID, link_token: str, *, ip: str | None = None,
                  user_agent: str | None = None) -> CommandResult:
        """``ip``, ``user_agent``: where the page was opened from, kept as evidence (not part of the
        request's identity: the same command from elsewhere answers the first result)."""

        def act(session: PaymentSession) -> None:
            if not session.link_token_matches(self.keyed_hash("link", link_token)):
                raise NotFound(f"no payment session {session_id}")
            key = self._session_key(session) if session.status == SessionStatus.LINK_SENT and (ip or user_agent) \
                else None
            session.open_link(self.clock.now(), ip=ip, user_agent=user_agent,
                              seal=self._sealer(key) if key is not None else None)

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
            merchant = self.merchant_to_read(session.merchant_id)
            return [self._sms(command_id, session, self.wording.new_code(merchant_name=merchant.name, code=code))]

        result = self._execute(command_id, "resend_code", {"session_id": str(session_id)}, session_id,
                               decide, messages=sms)
        return LinkIssued(result, "", "" if result.replayed else code)

    def record_sms_sent(self, message_id: UUID, session_id: UUID, provider_reference: str) -> CommandResult:
        return self._session_command(
            f"sms_sent:{message_id}", "record_sms_sent", session_id, {"provider_reference": provider_reference},
            lambda s: s.record_sms_sent(str(message_id), provider_reference),
        )

    def record_sms_sent_many(self, sent: Sequence[tuple[UUID, UUID, str]]) -> int:
        """A dispatcher's batch of sends, ``(message id, session id, provider reference)``:
        the sessions loaded with one query and saved with one statement. Each session records a
        message once, so the batch recorded again (after a crash) records nothing twice."""
        by_session: dict[UUID, list[tuple[str, str]]] = {}
        for message_id, session_id, provider_reference in sent:
            by_session.setdefault(session_id, []).append((str(message_id), provider_reference))

        def record(session: PaymentSession) -> None:
            for message_id, provider_reference in by_session[session.id]:
                session.record_sms_sent(message_id, provider_reference)

        return self._change_many(PaymentSession, list(by_session), record)

    def record_order_delivered(self, session_id: UUID, status_code: int) -> CommandResult:
        return self._session_command(
            f"order_delivered:{session_id}", "record_order_delivered", session_id, {"status_code": status_code},
            lambda s: s.record_order_delivered(status_code),
        )

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
            phone = self.session_phone(session)
            customer_id = self._session_customer_id(session)
            if phone is None or customer_id is None:
                raise NotFound(f"payment session {session_id} has no customer any more (erased)")
            outcome = verifier.verify(phone=phone, claim=claim)
            now = self.clock.now()
            session.record_identity_check(
                verified=outcome.verified, verifier=outcome.verifier, reason=outcome.reason, now=now,
            )
            changed: list[Aggregate] = [session]
            if outcome.verified:
                customer = self._find_customer_by_id(customer_id) or Customer.register(customer_id)
                customer.record_identity_verified(verifier=outcome.verifier, session_id=session_id, now=now)
                changed.append(customer)
            return changed, _session_result(session)

        request = {"session_id": str(session_id),
                   "claim": self.keyed_hash("identity", claim.date_of_birth, claim.postal_code)}
        return self._execute(command_id, "verify_identity", request, session_id, decide)

    def _customer_on_file(self, customer_id: UUID, phone: str) -> Customer | None:
        """The customer whose passed identity check stands in for a new one: under the pseudonym,
        or (a customer remembered before pseudonyms existed) under the id derived from the phone."""
        now, reuse = self.clock.now(), self.policy.identity_reuse
        for candidate in (customer_id, self._legacy_customer_id(phone)):
            customer = self._find_customer_by_id(candidate)
            if customer is not None and customer.identity_on_file(now, reuse):
                return customer
        return None

    def attach_payment_method(
        self, command_id: str, session_id: UUID, *, card_token: str, card_brand: str, card_last4: str,
        card_fingerprint: str | None = None,
    ) -> CommandResult:
        """Attach the tokenized card and create the Payment, atomically."""
        payment_id = self._derived_id(command_id, "payment")

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            session = self.get_session(session_id)
            merchant = self.merchant_to_read(session.merchant_id)
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
                splits=[Split.from_dict(s) for s in session.splits],
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
            lambda s: s.cancel(reason, seal=self._seal_for_session(s)), merchant_id,
        )

    def expire_session(self, session_id: UUID) -> CommandResult:
        return self._session_command(
            f"expire_session:{session_id}", "expire_session", session_id, {},
            lambda s: s.expire(self.clock.now()),
        )


def _session_result(session: PaymentSession) -> dict[str, Any]:
    return {"session_id": str(session.id), "status": session.status, "version": session.version}
