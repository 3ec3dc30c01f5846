"""The payment page over real HTTP (uvicorn on loopback) on real PostgreSQL, Redis and Kafka:
every step, new codes by SMS, the security headers, CSRF, double submits, and the card vault; then a scan of every
table, topic, cache key and log line for a card number.

Event encryption is off in this module, so the scan reads event state and envelopes in plain text:
a card number in an event would be found, not hidden by the cipher.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs
from adapters.kafka.relay import OutboxRelay
from adapters.notifications.sms import dev_inbox
from adapters.postgres.vault import CardVault, card_brand, check_expiry, luhn_valid, normalize_number
from api.bootstrap import build_api_services, build_message_dispatcher, envelope_opener, personal_data_reader
from api.http.app import asgi_app
from api.http.pages import CONTENT_SECURITY_POLICY
from api.http.redaction import redact_path
from api.http.services import ApiServices
from api.settings import Settings
from application.envelope import AGGREGATE_TYPE_NAMES
from application.errors import IdempotencyKeyReused, NotFound
from domain.errors import InvalidPaymentMethod
from projections.engine import ProjectionStore
from projections.registry import all_projections
from tests.api.conftest import serve

VAULT_KEY = b"v" * 32
PHONE = "+14155550123"
VISA_OK = "4242 4242 4242 4242"
VISA_DECLINED = "4000000000000002"
VISA_TIMEOUT = "4000000000000119"
MASTERCARD = "5555555555554444"
AMEX = "378282246310005"
EXPIRY = "12/34"


# -- the system under test --------------------------------------------------------------------


@dataclass
class PageSystem:
    url: str
    services: ApiServices
    vault: CardVault
    processor: SandboxProcessor
    clock: ManualClock
    merchant_id: UUID
    database_url: str
    settings: Settings

    def open_session(self, amount_minor: int = 2_500, tag: str | None = None) -> UUID:
        tag = tag or uuid.uuid4().hex[:8]
        items = [{"sku": "PZ-L", "name": "Large pizza", "quantity": 1,
                  "unit_amount_minor": amount_minor - 500},
                 {"sku": "SODA", "name": "Lemon soda", "quantity": 2, "unit_amount_minor": 250}]
        result = self.services.ledger.open_session(
            f"open-{tag}", merchant_id=self.merchant_id, amount_minor=amount_minor, currency="USD",
            customer_phone=PHONE, order_reference=f"ORDER-{tag}", line_items=items,
            voice_platform="alexa", conversation_id=f"conv-{tag}", callback_url=None,
        )
        return UUID(result.result["session_id"])

    def link(self, amount_minor: int = 2_500) -> tuple[UUID, str, str]:
        """A new session with its link sent, as the SMS sender would: (session id, token, code)."""
        session_id = self.open_session(amount_minor)
        issued = self.services.ledger.send_link(f"send-{session_id}", session_id)
        return session_id, issued.link_token, issued.code

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, follow_redirects=False)

    def status(self, session_id: UUID) -> str:
        return self.services.ledger.get_session(session_id).status

    def authorize_keys(self) -> list[str]:
        return [key for operation, key in self.processor.calls if operation == "authorize"]


def make_page_system(settings: Settings, database_url: str, servers: ServerURLs, clock: ManualClock,
                     processor: SandboxProcessor) -> Iterator[PageSystem]:
    services = build_api_services(settings, database_url, servers.redis_url, servers.kafka_bootstrap_servers,
                                  clock=clock, processor=processor)
    vault = services.vault
    assert vault is not None, "the settings carry a vault key"
    merchant_id = UUID(services.ledger.register_merchant("setup-pizza", name="Luigi's Pizza")
                       .result["merchant_id"])
    try:
        for url in serve(asgi_app(services)):
            yield PageSystem(url, services, vault, processor, clock, merchant_id, database_url, settings)
    finally:
        services.close()


def page_settings() -> Settings:
    """No event encryption (see the module docstring); Kafka topics of this test's own."""
    return Settings(hash_key=b"h" * 32, master_key=b"m" * 32, encryption_key=None, vault_key=VAULT_KEY,
                    topic_prefix=f"pay{uuid.uuid4().hex[:10]}")


@pytest.fixture
def settings() -> Settings:
    return page_settings()


@pytest.fixture
def system(settings: Settings, database_url: str, servers: ServerURLs, clock: ManualClock,
           processor: SandboxProcessor) -> Iterator[PageSystem]:
    yield from make_page_system(settings, database_url, servers, clock, processor)


# -- helpers that act like the browser ------------------------------------------------------


def hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden field {name} in the page"
    return match.group(1)


def words(html: str) -> str:
    """The page's text with runs of white space as one space, as a reader sees it."""
    return " ".join(html.split())


def form_of(html: str) -> dict[str, str]:
    return {"csrf": hidden(html, "csrf"), "form_id": hidden(html, "form_id")}


def submit(client: httpx.Client, token: str, step: str, page: str, **fields: str) -> httpx.Response:
    return client.post(f"/pay/{token}/{step}", data={**form_of(page), **fields})


def follow(client: httpx.Client, response: httpx.Response) -> httpx.Response:
    assert response.status_code == 303, response.text
    return client.get(response.headers["location"])


def pay_to_card_step(client: httpx.Client, token: str, code: str) -> str:
    page = client.get(f"/pay/{token}")
    assert page.status_code == 200, page.text
    return follow(client, submit(client, token, "code", page.text, code=code)).text


CVV_FIELD = re.compile(r"(?<![A-Za-z0-9_+/-])cvv(?![A-Za-z0-9_+/-])", re.IGNORECASE)


def test_cvv_field_pattern_finds_fields_and_not_token_letters() -> None:
    assert all(CVV_FIELD.search(text) for text in ('{"cvv": "123"}', "card_number=1&cvv=123", 'name="cvv"'))
    assert not any(CVV_FIELD.search(text) for text in ("/pay/Ab_cVvX9-q", "sealed:QkcvVw==x"))


def card(number: str = VISA_OK, expiry: str = EXPIRY, cvv: str = "123") -> dict[str, str]:
    return {"card_number": number, "expiry": expiry, "cvv": cvv}


def claim(born: str, postal_code: str = "94103") -> dict[str, str]:
    return {"date_of_birth": born, "postal_code": postal_code}


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def resend_form(html: str) -> dict[str, str]:
    """The hidden fields of the page's "Send a new code" form."""
    _, found, rest = html.partition('/resend"')
    assert found, "no resend form in the page"
    return form_of(rest)


def texted_new_codes(system: PageSystem) -> list[str]:
    """The new codes the customer's phone received, oldest first: the dispatcher sends what the
    outbox holds to the development mailbox, where the SMS are read."""
    build_message_dispatcher(system.settings, system.database_url, system.services.ledger).run_once()
    bodies = [message["body"] for message in reversed(dev_inbox(system.database_url, to=PHONE, limit=1000))]
    return [found.group(1) for body in bodies
            if (found := re.fullmatch(r"Luigi's Pizza: your new code is (\d{6})\. Never share this code\.", body))]


# -- every step --------------------------------------------------------------------------


def test_summary_shows_the_order_with_strict_headers_and_no_scripts(system: PageSystem) -> None:
    session_id, token, _ = system.link()
    with system.client() as client:
        page = client.get(f"/pay/{token}")
        css = client.get("/pay/assets/pay.css")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for response in (page, css):
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-content-type-options"] == "nosniff"
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    html = page.text
    for text in ("Luigi&#39;s Pizza", "Large pizza", "20.00 USD", "Lemon soda", "5.00 USD", "25.00 USD",
                 "ending in 0123", 'autocomplete="one-time-code"', '<label for="code">'):
        assert text in html, text
    assert "<script" not in html and "style=" not in html and "http://" not in html and "https://" not in html
    assert system.status(session_id) == "link_opened"


def count_loads(system: PageSystem, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the class name of every aggregate the ledger loads from the event store."""
    ledger = system.services.ledger
    loads: list[str] = []
    load = ledger._get

    def counted(cls: type[Any], aggregate_id: UUID, merchant_id: UUID | None = None) -> Any:
        loads.append(cls.__name__)
        return load(cls, aggregate_id, merchant_id)

    monkeypatch.setattr(ledger, "_get", counted)
    return loads


def test_a_page_names_the_kept_merchant_and_answers_from_what_its_command_saved(
        system: PageSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each page names the merchant from the ledger's kept copy (not a load from the event store
    per request, five a payment), and a rename saved by this process shows at once; the first
    view answers from the session its open_link command saved instead of loading it again."""
    ledger = system.services.ledger
    _, token, _ = system.link()
    loads = count_loads(system, monkeypatch)
    with system.client() as client:
        first = client.get(f"/pay/{token}")
        assert (first.status_code, loads.count("PaymentSession"), loads.count("Merchant")) == (200, 2, 0)
        assert "Luigi&#39;s Pizza" in first.text
        ledger.change_merchant_settings("rename-pizza", system.merchant_id, name="Mario's Pizza")
        loads.clear()
        again = client.get(f"/pay/{token}")
    assert again.status_code == 200 and "Mario&#39;s Pizza" in again.text
    assert loads.count("PaymentSession") == 1


def test_a_card_payment_goes_on_from_the_aggregates_each_step_saved(
        system: PageSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    """Posting the card attaches it, starts processing and records the answer: each step starts
    from the payment and session the step before saved, instead of loading them again (three
    payment loads and a session load a payment before)."""
    _, token, code = system.link()
    with system.client() as client:
        card_page = pay_to_card_step(client, token, code)
        loads = count_loads(system, monkeypatch)
        paid = submit(client, token, "card", card_page, **card())
        monkeypatch.undo()
        assert paid.status_code == 303 and "Payment complete" in words(follow(client, paid).text)
    # The page's own look-up of its session, attach's decision, and the outcome's decision (the
    # session is not among what start_processing saved).
    assert (loads.count("Payment"), loads.count("PaymentSession")) == (0, 3), loads


def test_happy_path_pays_once_and_shows_the_result(system: PageSystem) -> None:
    session_id, token, code = system.link()
    with system.client() as client:
        card_page = pay_to_card_step(client, token, code)
        assert 'autocomplete="cc-number"' in card_page and "Pay 25.00 USD" in words(card_page)
        paid = submit(client, token, "card", card_page, **card())
        result = follow(client, paid)
        again = client.get(f"/pay/{token}")
    assert result.status_code == 200 and "Payment complete" in words(result.text)
    assert "Visa ending in 4242" in words(result.text) and "Payment complete" in words(again.text)
    session = system.services.ledger.get_session(session_id)
    assert session.status == "completed"
    assert session.payment_id is not None
    payment = system.services.ledger.get_payment(session.payment_id)
    assert payment.status == "authorized" and payment.card_last4 == "4242" and payment.card_brand == "visa"
    assert payment.card_token.startswith("card_")
    assert system.vault.detokenize(payment.card_token).number == "4242424242424242"
    assert system.authorize_keys() == [f"authorize:{payment.id}"]


def test_five_wrong_codes_lock_the_session(system: PageSystem) -> None:
    session_id, token, code = system.link()
    with system.client() as client:
        page = client.get(f"/pay/{token}").text
        for left in (4, 3, 2, 1):
            response = submit(client, token, "code", page, code=wrong(code))
            assert response.status_code == 422
            tries = "1 try" if left == 1 else f"{left} tries"
            assert f"That code is not right. You have {tries} left." in words(response.text)
            assert 'aria-invalid="true"' in response.text
            page = response.text
        locked = submit(client, token, "code", page, code=wrong(code))
        after = client.get(f"/pay/{token}")
        right_too_late = submit(client, token, "code", page, code=code)
    assert locked.status_code == 423 and "This payment is locked" in words(locked.text)
    assert after.status_code == 423 and right_too_late.status_code == 423
    assert system.status(session_id) == "locked"


def test_a_malformed_code_is_not_an_attempt(system: PageSystem) -> None:
    session_id, token, _ = system.link()
    with system.client() as client:
        page = client.get(f"/pay/{token}").text
        response = submit(client, token, "code", page, code="12ab")
    assert response.status_code == 422 and "Enter the 6-digit code" in words(response.text)
    assert system.services.ledger.get_session(session_id).code_attempts_left == 5


def test_an_expired_link_says_so(system: PageSystem) -> None:
    session_id, token, code = system.link()
    with system.client() as client:
        page = client.get(f"/pay/{token}").text
        system.clock.advance(timedelta(minutes=16))
        expired = client.get(f"/pay/{token}")
        posted = submit(client, token, "code", page, code=code)
    assert expired.status_code == 410 and "This payment link has expired" in words(expired.text)
    assert posted.status_code == 410 and "expired" in words(posted.text)
    assert system.status(session_id) == "expired"


def test_an_unknown_link_is_a_friendly_404(system: PageSystem) -> None:
    session_id, token, _ = system.link()
    with system.client() as client:
        for path in ("/pay/nonsense", f"/pay/{session_id.hex}wrong-secret", f"/pay/{token[:-2]}xx"):
            response = client.get(path)
            assert response.status_code == 404, path
            assert "This link is not valid" in words(response.text)
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        posted = client.post("/pay/nonsense/code", data={"code": "123456"})
    assert posted.status_code == 404 and "text/html" in posted.headers["content-type"]
    assert system.status(session_id) == "link_sent"


def test_posts_without_the_csrf_token_or_from_another_origin_are_refused(system: PageSystem) -> None:
    session_id, token, code = system.link()
    with system.client() as client:
        page = client.get(f"/pay/{token}").text
        fields = form_of(page)
        attempts = [
            client.post(f"/pay/{token}/code", data={"form_id": fields["form_id"], "code": code}),
            client.post(f"/pay/{token}/code", data={**fields, "csrf": "0" * 64, "code": code}),
            client.post(f"/pay/{token}/code", data={**fields, "code": code},
                        headers={"Origin": "https://evil.example"}),
            client.post(f"/pay/{token}/code", data={**fields, "code": code},
                        headers={"Sec-Fetch-Site": "cross-site"}),
            client.post(f"/pay/{token}/code", json={**fields, "code": code}),
            client.post(f"/pay/{token}/code", data={**fields, "form_id": "short", "code": code}),
        ]
        # Another link's token does not open this one's forms either.
        _, other_token, _ = system.link()
        other = client.get(f"/pay/{other_token}").text
        attempts.append(client.post(f"/pay/{token}/code", data={**form_of(other), "code": code}))
        # Browsers send "Origin: null" on our own posts (Referrer-Policy: no-referrer): accepted.
        accepted = client.post(f"/pay/{token}/code", data={**fields, "code": code},
                               headers={"Origin": "null"})
    for response in attempts:
        assert response.status_code == 403 and "This form is out of date" in words(response.text)
    assert accepted.status_code == 303
    assert system.status(session_id) == "code_verified"


# -- a new code by SMS -------------------------------------------------------------------


def test_a_new_code_replaces_the_old_one(system: PageSystem) -> None:
    session_id, token, code = system.link()
    with system.client() as client:
        page = client.get(f"/pay/{token}?resent=1").text  # no resend yet: nothing to report
        assert "Didn't get it?" in words(page) and '<button type="submit" class="secondary">' in page
        assert "We sent a new code" not in page and 'role="status"' not in page
        assert len(dev_inbox(system.database_url, to=PHONE)) == 0 and texted_new_codes(system) == []
        resent = client.post(f"/pay/{token}/resend", data=resend_form(page))
        assert resent.status_code == 303 and resent.headers["location"] == f"/pay/{token}?resent=1"
        assert resent.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        notice = follow(client, resent)
        assert notice.status_code == 200 and '<div class="notice" role="status">' in notice.text
        assert ("We sent a new code to +1 ••• ••• 0123. Codes sent before it no longer work. "
                "You can ask for 2 more new codes.") in words(notice.text)
        assert "Send a new code" in notice.text
        new_codes = texted_new_codes(system)
        assert len(new_codes) == 1  # exactly one new SMS (the other one in the mailbox is the link's)
        assert len(dev_inbox(system.database_url, to=PHONE)) == 2
        (new_code,) = new_codes
        assert new_code != code
        old = submit(client, token, "code", notice.text, code=code)
        assert old.status_code == 422 and "That code is not right. You have 4 tries left." in words(old.text)
        card_page = follow(client, submit(client, token, "code", old.text, code=new_code))
    assert "Pay by card" in words(card_page.text)
    session = system.services.ledger.get_session(session_id)
    assert (session.status, session.code_resends, session.code_attempts) == ("code_verified", 1, 1)


def test_a_double_submitted_resend_texts_one_code(system: PageSystem) -> None:
    session_id, token, _ = system.link()
    with system.client() as client:
        fields = resend_form(client.get(f"/pay/{token}").text)
        responses: list[httpx.Response] = []

        def post() -> None:
            with system.client() as own:
                responses.append(own.post(f"/pay/{token}/resend", data=fields))

        threads = [threading.Thread(target=post) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        responses.append(client.post(f"/pay/{token}/resend", data=fields))  # and once more, later
        pages = [follow(client, response).text for response in responses]
    assert all("We sent a new code to +1 ••• ••• 0123" in words(page) for page in pages)
    assert all("You can ask for 2 more new codes." in words(page) for page in pages)
    assert len(texted_new_codes(system)) == 1
    assert system.services.ledger.get_session(session_id).code_resends == 1
    with psycopg.connect(system.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_messages").fetchone() == (2,)  # link + one code


def test_the_fourth_resend_is_refused(system: PageSystem) -> None:
    session_id, token, _ = system.link()
    with system.client() as client:
        page = client.get(f"/pay/{token}").text
        for left in ("2 more new codes", "1 more new code"):
            page = follow(client, client.post(f"/pay/{token}/resend", data=resend_form(page))).text
            assert f"You can ask for {left}." in words(page)
        third = resend_form(page)
        last = follow(client, client.post(f"/pay/{token}/resend", data=third)).text
        assert "That was the last new code we can send." in words(last)
        assert "Send a new code" not in last and "/resend" not in last
        assert "We cannot send any more codes for this payment." in words(last)
        # The third form sent again is the same command (no SMS), not a fourth resend.
        assert client.post(f"/pay/{token}/resend", data=third).status_code == 303
        # A fourth, from a tab that still showed the button: refused, and said so.
        refused = client.post(f"/pay/{token}/resend",
                              data={"csrf": hidden(last, "csrf"), "form_id": uuid.uuid4().hex})
        assert refused.status_code == 409 and "text/html" in refused.headers["content-type"]
        assert '<div class="alert" role="alert"><p>We cannot send any more codes: we already sent 3 new ones' \
            in refused.text
        assert "Enter the last code we sent, or ask the merchant for a new link." in words(refused.text)
        assert "Send a new code" not in refused.text and "/resend" not in refused.text
        codes = texted_new_codes(system)
        assert len(codes) == 3
        card_page = follow(client, submit(client, token, "code", refused.text, code=codes[-1]))
    assert "Pay by card" in words(card_page.text)
    assert system.services.ledger.get_session(session_id).code_resends == 3


def test_a_resend_is_refused_without_the_csrf_token_or_when_the_session_is_over(system: PageSystem) -> None:
    session_id, token, _ = system.link()
    locked_id, locked_token, locked_code = system.link()
    expired_id, expired_token, _ = system.link()
    with system.client() as client:
        fields = resend_form(client.get(f"/pay/{token}").text)
        forged = [
            client.post(f"/pay/{token}/resend", data={"form_id": fields["form_id"]}),
            client.post(f"/pay/{token}/resend", data={**fields, "csrf": "0" * 64}),
            client.post(f"/pay/{token}/resend", data=fields, headers={"Sec-Fetch-Site": "cross-site"}),
            client.post(f"/pay/{token}/resend", data=fields, headers={"Origin": "https://evil.example"}),
        ]
        unknown = client.post("/pay/nonsense/resend", data=fields)
        # Locked after five wrong codes, or expired: the same pages as the code form's.
        page = locked_page = client.get(f"/pay/{locked_token}").text
        for _ in range(5):
            page = submit(client, locked_token, "code", page, code=wrong(locked_code)).text
        locked = client.post(f"/pay/{locked_token}/resend", data=resend_form(locked_page))
        expired_page = client.get(f"/pay/{expired_token}").text
        system.clock.advance(timedelta(minutes=16))
        expired = client.post(f"/pay/{expired_token}/resend", data=resend_form(expired_page))
    for response in forged:
        assert response.status_code == 403 and "This form is out of date" in words(response.text)
    assert unknown.status_code == 404 and "This link is not valid" in words(unknown.text)
    assert locked.status_code == 423 and "This payment is locked" in words(locked.text)
    assert expired.status_code == 410 and "This payment link has expired" in words(expired.text)
    assert texted_new_codes(system) == []
    ledger = system.services.ledger
    assert [ledger.get_session(i).code_resends for i in (session_id, locked_id, expired_id)] == [0, 0, 0]
    assert system.status(session_id) == "link_opened" and system.status(locked_id) == "locked"


def test_identity_is_checked_above_the_threshold(system: PageSystem) -> None:
    session_id, token, code = system.link(amount_minor=15_000)
    with system.client() as client:
        identity_page = pay_to_card_step(client, token, code)
        assert "Confirm it is you" in words(identity_page) and 'autocomplete="bday"' in identity_page
        early_card = submit(client, token, "card", identity_page, **card())
        assert early_card.status_code == 303  # no card before the identity check
        rejected = submit(client, token, "identity", identity_page, **claim("1970-01-01"))
        assert rejected.status_code == 422 and "We could not confirm your identity" in words(rejected.text)
        assert "You have 2 tries left." in words(rejected.text)
        malformed = submit(client, token, "identity", rejected.text, **claim("yesterday", "!"))
        assert malformed.status_code == 422 and "Enter your date of birth." in words(malformed.text)
        verified = submit(client, token, "identity", rejected.text, **claim("1990-01-01"))
        card_page = follow(client, verified).text
        assert "Pay 150.00 USD" in words(card_page)
        done = follow(client, submit(client, token, "card", card_page, **card(MASTERCARD)))
    assert "Mastercard ending in 4444" in words(done.text)
    assert system.status(session_id) == "completed"


def test_a_customer_who_passed_the_check_goes_from_the_code_to_the_card_next_time(system: PageSystem) -> None:
    first_id, token, code = system.link(amount_minor=15_000)
    with system.client() as client:
        assert "Identity" in words(client.get(f"/pay/{token}").text)
        identity_page = pay_to_card_step(client, token, code)
        card_page = follow(client, submit(client, token, "identity", identity_page, **claim("1990-01-01"))).text
        follow(client, submit(client, token, "card", card_page, **card()))
    assert system.status(first_id) == "completed"

    second_id, token, code = system.link(amount_minor=15_000)  # same phone, above the threshold again
    with system.client() as client:
        summary = client.get(f"/pay/{token}").text
        assert "Identity" not in words(summary)  # the steps shown up front: code, card, done
        card_page = pay_to_card_step(client, token, code)
        assert "Confirm it is you" not in words(card_page) and "Pay 150.00 USD" in words(card_page)
        done = follow(client, submit(client, token, "card", card_page, **card(MASTERCARD)))
    assert "Mastercard ending in 4444" in words(done.text)
    assert system.status(second_id) == "completed"


def test_three_failed_identity_checks_end_the_session(system: PageSystem) -> None:
    session_id, token, code = system.link(amount_minor=15_000)
    with system.client() as client:
        page = pay_to_card_step(client, token, code)
        for _ in range(3):
            response = submit(client, token, "identity", page, **claim("1970-01-01"))
            page = response.text
    assert "We could not confirm your identity, so this payment link is closed." in words(page)
    assert system.status(session_id) == "failed"


def test_a_declined_card_can_be_replaced(system: PageSystem) -> None:
    session_id, token, code = system.link()
    with system.client() as client:
        card_page = pay_to_card_step(client, token, code)
        declined = submit(client, token, "card", card_page, **card(VISA_DECLINED))
        assert declined.status_code == 402
        assert "Your bank declined the card: not enough funds." in words(declined.text)
        assert "2 tries left" in words(declined.text) and 'name="card_number"' in declined.text
        done = follow(client, submit(client, token, "card", declined.text, **card()))
    assert "Payment complete" in words(done.text) and "ending in 4242" in words(done.text)
    assert len(set(system.authorize_keys())) == 2
    assert system.status(session_id) == "completed"


def test_three_declines_close_the_session(system: PageSystem) -> None:
    session_id, token, code = system.link()
    with system.client() as client:
        page = pay_to_card_step(client, token, code)
        for _ in range(3):
            page = submit(client, token, "card", page, **card(VISA_DECLINED)).text
    assert "declined too many times" in words(page) and system.status(session_id) == "failed"


def test_a_double_submitted_card_form_charges_once(system: PageSystem) -> None:
    session_id, token, code = system.link()
    with system.client() as client:
        card_page = pay_to_card_step(client, token, code)
        fields = {**form_of(card_page), **card()}
        responses: list[httpx.Response] = []

        def post() -> None:
            with system.client() as own:
                responses.append(own.post(f"/pay/{token}/card", data=fields))

        threads = [threading.Thread(target=post) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        responses.append(client.post(f"/pay/{token}/card", data=fields))  # and once more, later
        pages = [follow(client, response).text for response in responses]
    assert all("Payment complete" in words(page) and "ending in 4242" in words(page) for page in pages)
    session = system.services.ledger.get_session(session_id)
    assert set(system.authorize_keys()) == {f"authorize:{session.payment_id}"}
    with psycopg.connect(system.database_url) as conn:
        vault_rows = conn.execute("SELECT count(*) FROM card_vault").fetchone()
        attached = conn.execute("SELECT count(*) FROM ledger_events WHERE topic LIKE %s",
                                ("%PaymentMethodAttached",)).fetchone()
        payments = conn.execute("SELECT count(*) FROM ledger_events WHERE topic LIKE %s",
                                ("%Payment.Initiated",)).fetchone()
    assert vault_rows == (1,) and attached == (1,) and payments == (1,)


def test_a_declined_form_sent_twice_is_declined_once(system: PageSystem) -> None:
    session_id, token, code = system.link()
    with system.client() as client:
        card_page = pay_to_card_step(client, token, code)
        first = submit(client, token, "card", card_page, **card(VISA_DECLINED))
        second = submit(client, token, "card", card_page, **card(VISA_DECLINED))
    assert first.status_code == second.status_code == 402
    assert system.services.ledger.get_session(session_id).declines == 1
    assert len(set(system.authorize_keys())) == 1


def test_card_details_are_validated_and_never_echoed(system: PageSystem) -> None:
    _, token, code = system.link()
    with system.client() as client:
        page = pay_to_card_step(client, token, code)
        cases = [
            (card("4242424242424241"), "Check the card number: it is not valid."),
            (card("4242 4242 4242"), "Check the card number: it is not valid."),
            (card(MASTERCARD, expiry="01/20"), "This card has expired."),
            (card(MASTERCARD, expiry="13/30"), "Enter a valid expiry date (MM/YY)."),
            (card(MASTERCARD, expiry="soon"), "Enter the expiry date as MM/YY."),
            (card(MASTERCARD, cvv="12"), "Enter the 3-digit security code"),
            (card(AMEX, cvv="123"), "Enter the 4-digit security code"),
        ]
        for fields, message in cases:
            response = submit(client, token, "card", page, **fields)
            assert response.status_code == 422, (fields, response.text)
            assert message in response.text, message
            assert fields["card_number"].replace(" ", "") not in response.text.replace(" ", "")
            assert 'name="card_number" type="text" value=""' in response.text
            assert 'name="cvv" type="text" value=""' in response.text
        amex = follow(client, submit(client, token, "card", page, **card(AMEX, cvv="1234")))
    assert "American Express ending in 0005" in words(amex.text)
    with psycopg.connect(system.database_url) as conn:
        assert conn.execute("SELECT brand, last4 FROM card_vault").fetchall() == [("amex", "0005")]


def test_a_processor_timeout_shows_pending_then_the_result(system: PageSystem) -> None:
    session_id, token, code = system.link()
    with system.client() as client:
        card_page = pay_to_card_step(client, token, code)
        pending = submit(client, token, "card", card_page, **card(VISA_TIMEOUT))
        assert pending.status_code == 202 and "Please do not pay again" in words(pending.text)
        resolved = client.get(f"/pay/{token}")
    assert "Payment complete" in words(resolved.text) and system.status(session_id) == "completed"
    assert len(set(system.authorize_keys())) == 1


def test_a_cancelled_session_and_a_missing_vault_are_explained(system: PageSystem) -> None:
    session_id, token, _ = system.link()
    _, other_token, other_code = system.link()
    system.services.ledger.cancel_session("cancel-it", session_id)
    with system.client() as client:
        cancelled = client.get(f"/pay/{token}")
        card_page = pay_to_card_step(client, other_token, other_code)
        system.services.vault = None  # type: ignore[attr-defined,unused-ignore]
        unconfigured = submit(client, other_token, "card", card_page, **card())
    assert cancelled.status_code == 410 and "This payment was cancelled" in words(cancelled.text)
    assert unconfigured.status_code == 409 and "not configured" in words(unconfigured.text)
    assert "text/html" in unconfigured.headers["content-type"]


def test_the_link_token_is_kept_out_of_logged_paths() -> None:
    assert redact_path("/pay/abc123/card") == "/pay/{token}/card"
    assert redact_path("/pay/abc123") == "/pay/{token}"
    assert redact_path("/pay/assets/pay.css") == "/pay/assets/pay.css"
    assert redact_path("/v1/payments") == "/v1/payments"


# -- the vault ---------------------------------------------------------------------------


NOW = datetime(2026, 6, 15, tzinfo=UTC)


@pytest.mark.parametrize(("number", "brand"), [
    ("4242424242424242", "visa"), ("4222222222222", "visa"), ("5555555555554444", "mastercard"),
    ("2223003122003222", "mastercard"), ("378282246310005", "amex"), ("6011111111111117", "discover"),
    ("6221260000000000", "discover"), ("3530111333300000", "jcb"), ("30569309025904", "diners"),
    ("36227206271667", "diners"), ("6200000000000005", "unionpay"), ("9999999999999995", "unknown"),
])
def test_brands_come_from_iin_ranges(number: str, brand: str) -> None:
    assert luhn_valid(number)
    assert card_brand(normalize_number(number)) == brand


@pytest.mark.parametrize("number", ["4242424242424241", "42424242", "4242-4242-4242-424x", "",
                                    "٤٢٤٢٤٢٤٢٤٢٤٢٤٢٤٢", "3782822463100050"])
def test_invalid_numbers_are_refused(number: str) -> None:
    with pytest.raises(InvalidPaymentMethod, match="card number is not valid"):
        card_brand(normalize_number(number))


def test_expiry_is_checked_against_the_month() -> None:
    assert check_expiry(6, 2026, NOW) == (6, 2026)
    assert check_expiry(1, 30, NOW) == (1, 2030)
    with pytest.raises(InvalidPaymentMethod, match="card has expired"):
        check_expiry(5, 2026, NOW)
    for month, year in ((0, 2030), (13, 2030), (1, 2090)):
        with pytest.raises(InvalidPaymentMethod, match="expiry date is not valid"):
            check_expiry(month, year, NOW)


def test_the_vault_stores_ciphertext_under_its_own_key(database_url: str, owner_database_url: str) -> None:
    vault = CardVault(database_url, VAULT_KEY)
    try:
        first = vault.tokenize("4242 4242 4242 4242", 12, 2034, now=NOW)
        second = vault.tokenize("4242424242424242", 12, 2034, now=NOW)
        assert first.token != second.token and re.fullmatch(r"card_[a-z]{30}", first.token)
        assert (first.brand, first.last4) == ("visa", "4242")
        # One card, one fingerprint whatever its token (card velocity counts on it); letters only.
        assert first.fingerprint == second.fingerprint and re.fullmatch(r"fp_[a-z]{30}", first.fingerprint)
        assert vault.tokenize("5555 5555 5555 4444", 12, 2034, now=NOW).fingerprint != first.fingerprint
        retried = vault.tokenize("4242424242424242", 12, 2034, now=NOW, idempotency_key="form-1")
        assert vault.tokenize("4242424242424242", 12, 2034, now=NOW, idempotency_key="form-1") == retried
        with pytest.raises(IdempotencyKeyReused):
            vault.tokenize(MASTERCARD, 12, 2034, now=NOW, idempotency_key="form-1")
        details = vault.detokenize(first.token)
        assert (details.number, details.exp_month, details.exp_year) == ("4242424242424242", 12, 2034)
        assert "4242424242424242" not in repr(details)
        with pytest.raises(NotFound):
            vault.detokenize("card_" + "a" * 30)
        with psycopg.connect(owner_database_url) as conn:  # the application may not move a ciphertext
            rows = conn.execute("SELECT token, ciphertext, nonce FROM card_vault").fetchall()
            assert all(b"4242424242424242" not in bytes(row[1]) for row in rows)
            # A ciphertext moved to another token's row does not open (the token is authenticated).
            conn.execute("UPDATE card_vault SET ciphertext = %s, nonce = %s WHERE token = %s",
                         (rows[1][1], rows[1][2], rows[0][0]))
        with pytest.raises(ValueError):
            vault.detokenize(rows[0][0])
        with pytest.raises(ValueError):
            CardVault(database_url, b"short").close()
        with pytest.raises(ValueError):
            CardVault(vault.pool, b"w" * 32).detokenize(second.token)  # another key opens nothing
    finally:
        vault.close()


# -- no card number anywhere -------------------------------------------------------------


_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9]{13,19}(?![0-9])")
_GROUPED = re.compile(r"(?<![0-9A-Za-z])[0-9]{4}([ -])[0-9]{4,6}\1[0-9]{4,5}(?:\1[0-9]{1,7})?(?![0-9A-Za-z])")
_HEX_WORD = re.compile(r"[0-9a-fA-F]{32,}")


def card_numbers_in(text: str) -> list[str]:
    """Luhn-valid 13-19 digit runs, plain or grouped by spaces or dashes. Runs inside a long hex
    word (a SHA-256, a hex UUID) are not card numbers and are skipped: by chance one in a few
    hundred hashes holds a Luhn-valid run, which would make the scan flaky without telling more."""
    hex_spans = [m.span() for m in _HEX_WORD.finditer(text) if not m.group().isdigit()]
    found = []
    for match in _DIGIT_RUN.finditer(text):
        inside_hex = any(start <= match.start() and match.end() <= end for start, end in hex_spans)
        if not inside_hex and luhn_valid(match.group()):
            found.append(match.group())
    for match in _GROUPED.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            found.append(digits)
    return found


class RawBytes(str):
    """Binary data that is not UTF-8 text (ciphertext, a hash), read as latin-1: scanned for digit
    runs, but not for field names, since random bytes spell "cvv" between two non-word bytes now
    and then. Bytes that are text (a JSON event state) stay plain text and are scanned for both."""


def as_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return RawBytes(bytes(value).decode("latin-1"))
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def database_texts(database_url: str) -> dict[str, list[str]]:
    """Every value of every row of every table, as text (bytea as raw bytes, not hex)."""
    texts: dict[str, list[str]] = {}
    with psycopg.connect(database_url) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
            " AND table_schema NOT IN ('pg_catalog', 'information_schema')").fetchall()
        for schema, table in tables:
            rows = conn.execute(psycopg.sql.SQL("SELECT * FROM {}.{}").format(
                psycopg.sql.Identifier(schema), psycopg.sql.Identifier(table))).fetchall()
            texts[table] = [as_text(value) for row in rows for value in row if value is not None]
    return texts


def kafka_texts(bootstrap: str) -> dict[str, list[str]]:
    """Every message (key, value, headers) of every topic on the broker, from offset 0."""
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": f"scan-{uuid.uuid4().hex}",
                       "enable.auto.commit": False, "enable.partition.eof": True})
    texts: dict[str, list[str]] = {}
    try:
        metadata = client.list_topics(timeout=10)
        ends = {}
        for topic, info in metadata.topics.items():
            if topic.startswith("__"):
                continue
            texts[topic] = []
            for partition in info.partitions:
                _, high = client.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                if high > 0:
                    ends[(topic, partition)] = high
        client.assign([TopicPartition(t, p, 0) for t, p in ends])
        remaining = set(ends)
        deadline = time.monotonic() + 60
        while remaining:
            assert time.monotonic() < deadline, f"topics not read to the end: {remaining}"
            for message in client.consume(1000, timeout=0.5):
                topic, partition, offset = message.topic(), message.partition(), message.offset()
                assert topic is not None and partition is not None and offset is not None
                error = message.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    remaining.discard((topic, partition))
                    continue
                if offset + 1 >= ends[(topic, partition)]:
                    remaining.discard((topic, partition))
                raw_headers: Any = message.headers() or []
                headers = "".join(as_text(v) for _, v in raw_headers if v is not None)
                texts[topic].append(as_text(message.key() or b"") + as_text(message.value() or b"") + headers)
    finally:
        client.close()
    return texts


def redis_texts(client: Any) -> list[str]:
    texts = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        values: Any = []
        if kind == "string":
            values = [client.get(key)]
        elif kind == "hash":
            values = [part for pair in client.hgetall(key).items() for part in pair]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind in ("set", "zset"):
            values = client.smembers(key) if kind == "set" else client.zrange(key, 0, -1)
        texts.append(as_text(key) + " " + " ".join(as_text(v) for v in values))
    return texts


def publish_outbox(system: PageSystem, bootstrap: str) -> None:
    relay = OutboxRelay(system.database_url, bootstrap, open_envelope=envelope_opener(system.settings),
                        partitions_per_topic=1, topic_prefix=system.settings.topic_prefix)
    try:
        relay.ensure_topics()
        deadline = time.monotonic() + 30
        while True:
            relay.run_once()
            with psycopg.connect(system.database_url) as conn:
                left = conn.execute("SELECT count(*) FROM outbox_pending").fetchone()
            if left == (0,):
                return
            assert time.monotonic() < deadline, f"{left} outbox rows unpublished"
            time.sleep(0.1)
    finally:
        relay.close()


def test_the_scanner_finds_card_numbers_in_any_form() -> None:
    for text in ('{"number": "4242424242424242"}', "card 4242 4242 4242 4242.", "5555-5555-5555-4444",
                 "pan=378282246310005&", "tok4242424242424242", "3782 822463 10005"):
        assert card_numbers_in(text), text
    for text in ("4242424242424241", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                 "2026-11-23 03:39:32,593", "12345678-1234-5678-1234-567812345678"):
        assert not card_numbers_in(text), text


def test_no_card_number_anywhere_after_a_full_run(
    system: PageSystem, servers: ServerURLs, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    typed = ["4242424242424242", VISA_DECLINED, VISA_TIMEOUT, MASTERCARD, AMEX]
    with system.client() as client:
        # Paid by Visa; paid by Mastercard after an identity check; declined, then Amex.
        _, token, code = system.link()
        follow(client, submit(client, token, "card", pay_to_card_step(client, token, code), **card()))
        _, token, code = system.link(amount_minor=15_000)
        identity = pay_to_card_step(client, token, code)
        page = follow(client, submit(client, token, "identity", identity, **claim("1990-01-01"))).text
        follow(client, submit(client, token, "card", page, **card(MASTERCARD)))
        _, token, code = system.link()
        page = pay_to_card_step(client, token, code)
        declined = submit(client, token, "card", page, **card(VISA_DECLINED)).text
        submit(client, token, "card", declined, **card(MASTERCARD, expiry="01/20"))  # expired: refused
        follow(client, submit(client, token, "card", declined, **card(AMEX, cvv="4321")))
        # A timeout resolved later; a card posted to a locked session and with a forged form.
        _, token, code = system.link()
        pending = submit(client, token, "card", pay_to_card_step(client, token, code), **card(VISA_TIMEOUT))
        assert pending.status_code == 202
        client.get(f"/pay/{token}")
        _, token, code = system.link()
        first = page = client.get(f"/pay/{token}").text
        for _ in range(5):
            page = submit(client, token, "code", page, code=wrong(code)).text
        assert "This payment is locked" in words(page)
        client.post(f"/pay/{token}/card", data={**form_of(first), **card()})
        client.post(f"/pay/{token}/card", data={"csrf": "x", "form_id": "y" * 20, **card(MASTERCARD)})
    # Read models, their Redis cache and Kafka get everything the run produced.
    store = ProjectionStore(system.database_url, list(all_projections(personal_data_reader(system.settings)).values()),
                            envelope_opener(system.settings))
    try:
        assert store.catch_up(grace=timedelta(0)) > 0
    finally:
        store.close()
    from projections.status_cache import StatusCache

    with psycopg.connect(system.database_url) as conn:
        ids = [row[0] for row in conn.execute(
            "SELECT session_id FROM session_status UNION ALL SELECT payment_id FROM payment_status")]
        assert system.services.redis is not None
        assert StatusCache(system.services.redis).refresh(conn, ids) > 0
    publish_outbox(system, servers.kafka_bootstrap_servers)

    tables = database_texts(system.database_url)
    topics = kafka_texts(servers.kafka_bootstrap_servers)
    cache = redis_texts(system.services.redis)
    out, err = capfd.readouterr()
    logs = [out, err, caplog.text]

    # The scan sees what it should: plain event state, envelopes, tokens and last four digits.
    assert {"card_vault", "ledger_events", "outbox", "command_log", "session_status", "payment_status",
            "audit_log"} <= set(tables)
    events = " ".join(tables["ledger_events"])
    assert "PaymentMethodAttached" in events and '"card_last4":"4444"' in events.replace(" ", "")
    assert len(tables["card_vault"]) == 8 * 5  # five cards vaulted (the refused ones not): eight values a row
    mine = [t for t in topics if t.startswith(system.settings.topic_prefix)]
    assert len(mine) == len(AGGREGATE_TYPE_NAMES)
    assert any("card_" in text and "0005" in text for t in mine for text in topics[t])
    assert any(":status:payment:" in text for text in cache)

    everything = {
        **{f"table {name}": values for name, values in tables.items()},
        # This system's topics: the broker is shared by the whole test run, and other tests'
        # topics hold their own synthetic (and encrypted) data.
        **{f"topic {name}": topics[name] for name in mine},
        "redis": cache, "logs": logs,
    }
    # The processor's references (`sandbox_<16 hex>`) are random and about once in three hundred
    # runs one holds a Luhn-valid run of 13 or more digits: the sandbox's own answers are taken
    # out before the scan, exactly, rather than skipping every 16-hex word.
    references = system.processor.references()
    assert references, "the run made no processor call"

    def without_references(text: str) -> str:
        for reference in references:
            text = text.replace(reference, " ")
        return text

    leaks = {where: found for where, values in everything.items()
             if (found := [n for text in values for n in card_numbers_in(without_references(text))])}
    assert leaks == {}
    # A field named cvv (a form field, a JSON key, an HTML input): the word on its own, not three
    # letters inside a random link token or ciphertext, where "cVv" turns up about once in 130 runs.
    assert not [where for where, values in everything.items()
                if any(CVV_FIELD.search(text) for text in values if not isinstance(text, RawBytes))], \
        "a CVV field reached storage or logs"
    for number in typed:
        assert not any(number in text for values in everything.values() for text in values)
    assert "/pay/{token}" in "".join(logs) or "/pay/" in "".join(logs), "the request logs were not captured"

    # And the scan would have seen a number had one been stored (a canary row, this test's database).
    with psycopg.connect(system.database_url) as conn:
        conn.execute("INSERT INTO idempotency_records (scope, idempotency_key, request_hash, state,"
                     " response_body, locked_until, expires_at) VALUES ('canary', 'k', 'h', 'completed',"
                     " '{\"card\": \"5555 5555 5555 4444\"}', now(), now())")
    canary = " ".join(database_texts(system.database_url)["idempotency_records"])
    assert card_numbers_in(canary) == [MASTERCARD]
