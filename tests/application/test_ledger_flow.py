"""The Ledger application's narrative: the journey, idempotency and processor safety. It runs
once per backend (PostgreSQL, and the eventsourcing library's in-memory store with our outbox and
command log), by subclassing, as the library's own examples do."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from uuid import UUID

import pytest

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from api.settings import Settings
from application.errors import IdempotencyKeyReused, NotFound, ProcessorUnavailable
from application.ledger import Ledger
from application.ports import IdentityClaim
from domain.errors import (
    IdentityCheckRequired,
    InvalidTransition,
    LinkExpired,
    MerchantLimitExceeded,
    RefundExceedsCaptured,
    SessionLocked,
    UnknownCurrency,
)
from tests.application.backends import MemoryStore, PostgresStore, Store, memory_ledger
from tests.application.flows import PHONE, new_merchant, open_session, pay


class LedgerNarrative:
    """The story; a subclass gives the ``ledger`` and its ``store``."""

    def test_a_voice_payment_from_open_to_refund(self, ledger: Ledger, store: Store) -> None:
        merchant_id = new_merchant(ledger)
        session_id = open_session(ledger, merchant_id, amount_minor=2_500)
        payment_id = pay(ledger, session_id)

        authorized = ledger.authorize_payment(payment_id)
        assert authorized.result["status"] == "authorized"
        assert ledger.get_session(session_id).status == "completed"

        ledger.capture_payment("capture-1", payment_id)
        ledger.refund_payment("refund-1", payment_id, amount_minor=1_000, reason="cold pizza")
        ledger.refund_payment("refund-2", payment_id, amount_minor=1_500, reason="still cold")
        payment = ledger.get_payment(payment_id)
        assert (payment.captured_minor, payment.refunded_minor, payment.status) == (2_500, 2_500, "refunded")
        # 2.9% of 2500 = 72.5 -> 73 (half up), plus 30.
        assert payment.fee_minor == 103

        envelopes = store.envelopes()
        types = [e.event_type for e in envelopes if e.aggregate_id == payment_id]
        assert types == [
            "payment.initiated", "payment.risk_assessed", "payment.processing_started", "payment.authorized",
            "payment.captured", "payment.refunded", "payment.refunded",
        ]
        balances: dict[tuple[str, str], int] = defaultdict(int)
        for envelope in envelopes:
            for posting in envelope.data.get("postings", []):
                sign = 1 if posting["direction"] == "debit" else -1
                balances[(posting["account"], posting["currency"])] += sign * posting["amount_minor"]
        assert sum(balances.values()) == 0
        # The merchant was credited 2500 - 103 and debited 2500 by the refunds: it owes back the fee.
        assert balances[(f"merchant:{merchant_id}:payable", "USD")] == 103
        assert balances[("platform:fees", "USD")] == -103
        assert balances[("processor_clearing", "USD")] == 0

    def test_authorization_goes_on_from_the_copies_it_is_given_and_never_saves_a_stale_one(
        self, ledger: Ledger, store: Store
    ) -> None:
        session_id = open_session(ledger, new_merchant(ledger))
        payment_id = pay(ledger, session_id)
        before = [ledger.get_payment(payment_id), ledger.get_session(session_id)]
        first = ledger.authorize_payment(payment_id, known=[ledger.get_payment(payment_id)])
        assert first.result["status"] == "authorized" and not first.replayed
        authorized = [ledger.get_payment(payment_id), ledger.get_session(session_id)]
        ledger.capture_payment("capture-after", payment_id)
        # Copies from before the authorization (its start is replayed from the command log) or
        # from after it: the answer is the payment as it is now, and nothing is saved on top of
        # an old version.
        for stale in (before, authorized):
            again = ledger.authorize_payment(payment_id, known=stale)
            assert again.replayed and again.result["status"] == "captured"
        types = [e.event_type for e in store.envelopes() if e.aggregate_id == payment_id]
        assert types == ["payment.initiated", "payment.risk_assessed", "payment.processing_started",
                         "payment.authorized", "payment.captured"]

    def test_the_link_and_code_are_texted_in_the_opening_save_and_only_once(
        self, ledger: Ledger, store: Store
    ) -> None:
        merchant_id = new_merchant(ledger)
        fields = dict(
            merchant_id=merchant_id, amount_minor=2_500, currency="USD", customer_phone=PHONE,
            order_reference="ORDER-7", voice_platform="alexa", conversation_id="conv-1",
            line_items=[{"sku": "PZ-L", "name": "Large pizza", "quantity": 1, "unit_amount_minor": 2_500}],
        )
        issued = ledger.open_session_and_send_link("open-and-send", **fields)
        assert issued.result.result["status"] == "link_sent" and issued.link_token and issued.code
        link_text = (f"Luigi's Pizza: pay 25.00 USD for order ORDER-7 at {ledger.policy.public_url}/pay/"
                     f"{issued.link_token} - your code is {issued.code}. The link expires in 15 min. "
                     "Never share this code.")
        assert store.sms() == [{"to": PHONE, "body": link_text}]
        replayed = ledger.open_session_and_send_link("open-and-send", **fields)
        assert replayed.result.replayed and (replayed.link_token, replayed.code) == ("", "")

        resent = ledger.resend_code("resend", UUID(issued.result.result["session_id"]))
        code_text = f"Luigi's Pizza: your new code is {resent.code}. Never share this code."
        assert sorted(m["body"] for m in store.sms()) == sorted([link_text, code_text])

    def test_same_command_id_same_request_replays_and_different_request_conflicts(
        self, ledger: Ledger, store: Store
    ) -> None:
        merchant_id = new_merchant(ledger)
        first = ledger.register_merchant("merchant-1", name="Luigi's Pizza")
        assert first.replayed and first.result["merchant_id"] == str(merchant_id)
        with pytest.raises(IdempotencyKeyReused):
            ledger.register_merchant("merchant-1", name="Mario's Pizza")

        session_id = open_session(ledger, merchant_id, command_id="open-A")
        again = open_session(ledger, merchant_id, command_id="open-A")
        assert again == session_id
        with pytest.raises(IdempotencyKeyReused):
            open_session(ledger, merchant_id, command_id="open-A", amount_minor=999)
        assert store.event_count() == 2

    def test_rejections_write_nothing(self, ledger: Ledger, store: Store) -> None:
        merchant_id = new_merchant(ledger, max_amount_minor={"USD": 10_000})
        with pytest.raises(UnknownCurrency):
            open_session(ledger, merchant_id, currency="XXX")
        with pytest.raises(MerchantLimitExceeded):
            open_session(ledger, merchant_id, amount_minor=10_001)
        with pytest.raises(NotFound):
            ledger.get_session(UUID(int=1))
        assert (store.event_count(), store.command_count()) == (1, 1)

    def test_another_merchants_session_is_not_found(self, ledger: Ledger) -> None:
        mine = new_merchant(ledger, "m-mine")
        theirs = new_merchant(ledger, "m-theirs")
        session_id = open_session(ledger, theirs)
        with pytest.raises(NotFound):
            ledger.cancel_session("cancel-1", session_id, merchant_id=mine)
        ledger.cancel_session("cancel-2", session_id, merchant_id=theirs)
        assert ledger.get_session(session_id).status == "cancelled"

    def test_five_wrong_codes_lock_the_session(self, ledger: Ledger) -> None:
        session_id = open_session(ledger, new_merchant(ledger))
        link = ledger.send_link("send", session_id)
        wrong = "000000" if link.code != "000000" else "111111"
        checks = [ledger.verify_code(f"guess-{i}", session_id, wrong).result["code_check"] for i in range(5)]
        assert checks == ["incorrect"] * 4 + ["locked"]
        with pytest.raises(SessionLocked):
            ledger.verify_code("guess-5", session_id, link.code)

    def test_identity_required_above_threshold_and_link_expiry(self, ledger: Ledger, clock: ManualClock) -> None:
        merchant_id = new_merchant(ledger)
        big = open_session(ledger, merchant_id, command_id="open-big", amount_minor=10_001)
        link = ledger.send_link("send-big", big)
        ledger.verify_code("code-big", big, link.code)
        with pytest.raises(IdentityCheckRequired):
            ledger.attach_payment_method("attach-big", big, card_token="t", card_brand="visa", card_last4="4242")

        small = open_session(ledger, merchant_id, command_id="open-small", amount_minor=10_000)
        assert not ledger.get_session(small).identity_required
        link = ledger.send_link("send-small", small)
        clock.advance(ledger.policy.link_lifetime)
        with pytest.raises(LinkExpired):
            ledger.verify_code("code-small", small, link.code)
        ledger.expire_session(small)
        assert ledger.get_session(small).status == "expired"

    def test_declined_card_returns_the_customer_to_choose_another(self, ledger: Ledger) -> None:
        session_id = open_session(ledger, new_merchant(ledger))
        declined = pay(ledger, session_id, last4="0002")
        assert ledger.authorize_payment(declined).result["status"] == "failed"
        assert ledger.get_session(session_id).status == "code_verified"
        second = UUID(
            ledger.attach_payment_method(
                "attach-2", session_id, card_token="tok_4242", card_brand="visa", card_last4="4242"
            ).result["payment_id"]
        )
        assert ledger.authorize_payment(second).result["status"] == "authorized"
        assert ledger.get_payment(declined).failure_code == "insufficient_funds"

    def test_unknown_authorization_is_resolved_by_asking_not_by_charging_again(
        self, ledger: Ledger, processor: SandboxProcessor
    ) -> None:
        payment_id = pay(ledger, open_session(ledger, new_merchant(ledger)), last4="0119")
        with pytest.raises(ProcessorUnavailable):
            ledger.authorize_payment(payment_id)
        assert ledger.get_payment(payment_id).status == "processing"
        assert ledger.resolve_authorization(payment_id).result["status"] == "authorized"
        assert [c for c in processor.calls if c[0] == "authorize"] == [("authorize", f"authorize:{payment_id}")]

    def test_capture_refund_rules_and_retried_commands_call_processor_with_the_same_key(
        self, ledger: Ledger, processor: SandboxProcessor
    ) -> None:
        payment_id = pay(ledger, open_session(ledger, new_merchant(ledger), amount_minor=5_000))
        ledger.authorize_payment(payment_id)
        ledger.capture_payment("cap", payment_id, amount_minor=4_000)
        with pytest.raises(InvalidTransition):
            ledger.capture_payment("cap-again", payment_id)
        assert ledger.capture_payment("cap", payment_id, amount_minor=4_000).replayed
        with pytest.raises(RefundExceedsCaptured):
            ledger.refund_payment("ref-big", payment_id, amount_minor=4_001)
        ledger.refund_payment("ref", payment_id, amount_minor=1_000)
        ledger.refund_payment("ref", payment_id, amount_minor=1_000)  # replay, not a second refund
        assert ledger.get_payment(payment_id).refunded_minor == 1_000
        assert sum(1 for op, _ in processor.calls if op == "capture") == 1
        assert sum(1 for op, _ in processor.calls if op == "refund") == 1

    def test_identity_check_above_the_threshold_then_payment(self, ledger: Ledger) -> None:
        session_id = open_session(ledger, new_merchant(ledger), amount_minor=25_000)
        link = ledger.send_link("send", session_id)
        ledger.verify_code("code", session_id, link.code)
        rejected = ledger.verify_identity("id-1", session_id, IdentityClaim("1970-01-01", "94105"))
        assert rejected.result["status"] == "code_verified"
        verified = ledger.verify_identity("id-2", session_id, IdentityClaim("1990-01-01", "94105"))
        assert verified.result["status"] == "identity_verified"
        payment = ledger.attach_payment_method("attach", session_id, card_token="t", card_brand="visa",
                                               card_last4="4242")
        assert ledger.authorize_payment(UUID(payment.result["payment_id"])).result["status"] == "authorized"
        assert ledger.get_session(session_id).status == "completed"

    def test_api_keys_authenticate_until_revoked_and_only_their_hash_is_stored(
        self, ledger: Ledger, store: Store
    ) -> None:
        merchant_id = new_merchant(ledger)
        result, token = ledger.issue_api_key("key-1", role="merchant", merchant_id=merchant_id, label="till")
        key = ledger.authenticate(token)
        assert key is not None and (key.role, key.merchant_id) == ("merchant", merchant_id)
        assert ledger.issue_api_key("key-1", role="merchant", merchant_id=merchant_id, label="till")[1] == ""
        for forged in (token[:-1] + ("x" if token[-1] != "x" else "y"), "et_nothex_abc", "Bearer " + token, ""):
            assert ledger.authenticate(forged) is None
        _, analyst = ledger.issue_api_key("key-2", role="analyst")
        assert ledger.authenticate(analyst).role == "analyst"  # type: ignore[union-attr]
        ledger.revoke_api_key("revoke-1", UUID(result.result["key_id"]), reason="leaked")
        assert ledger.authenticate(token) is None
        secret = token.split("_", 2)[2].encode()  # the secret itself may hold "_"
        assert not any(secret in stored for stored in store.stored_bytes())

    def test_a_payment_link_names_its_session_and_nothing_else(self, ledger: Ledger) -> None:
        session_id = open_session(ledger, new_merchant(ledger))
        link = ledger.send_link("send", session_id)
        assert ledger.session_for_link(link.link_token).id == session_id
        for forged in (link.link_token[:-1], session_id.hex, "not-a-link", link.link_token[:32] + "x" * 43, ""):
            with pytest.raises(NotFound):
                ledger.session_for_link(forged)

    def test_a_session_opened_before_a_new_merchant_limit_replays_its_first_result(self, ledger: Ledger) -> None:
        """A retried creation is answered from the command log even when deciding it again would
        now be refused: the command already ran."""
        merchant_id = new_merchant(ledger, command_id="limited-merchant")
        first = open_session(ledger, merchant_id, command_id="before-the-limit", amount_minor=2_500)
        ledger.change_merchant_settings("limited-merchant:limit", merchant_id, max_amount_minor={"USD": 1_000})
        with pytest.raises(MerchantLimitExceeded):
            open_session(ledger, merchant_id, command_id="after-the-limit", amount_minor=2_500)
        assert open_session(ledger, merchant_id, command_id="before-the-limit", amount_minor=2_500) == first


class TestOnPostgreSQL(LedgerNarrative):
    @pytest.fixture
    def store(self, ledger: Ledger, database_url: str) -> Store:
        return PostgresStore(ledger, database_url)


class TestInMemory(LedgerNarrative):
    @pytest.fixture
    def ledger(self, settings: Settings, clock: ManualClock, processor: SandboxProcessor) -> Iterator[Ledger]:
        built = memory_ledger(settings, clock, processor)
        yield built
        built.close()

    @pytest.fixture
    def store(self, ledger: Ledger) -> Store:
        return MemoryStore(ledger)
