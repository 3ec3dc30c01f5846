"""The dispute evidence pack on real PostgreSQL: a paid and captured journey read back from the
audit trail in position order, every line naming its audit row; the same customer's earlier
undisputed payments; nothing of a full phone or card number; the PDF read back with pypdf."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import eventsourcing.domain
import psycopg
import pytest
from psycopg.rows import dict_row
from pypdf import PdfReader

from adapters.clock import ManualClock
from adapters.postgres.vault import CardVault, VaultedCard
from api.bootstrap import personal_data_reader
from api.settings import Settings
from application.ledger import Ledger
from application.masking import PersonalDataReader
from application.ports import IdentityClaim
from projections.evidence import NOT_RECORDED, build_pack, scrub
from projections.evidence_pdf import latin1, render_pdf
from projections.status import card_fingerprint_hash
from projections.views import READER_ROLE, Scope
from tests.application.flows import PHONE, new_merchant
from tests.projections.test_views import catch_up

OTHER_PHONE = "+14155550199"
CARD_NUMBER = "4242 4242 4242 4242"
GOOD_IDENTITY = IdentityClaim("1990-01-01", "94107")
# The customer's phone typed into an item's name: the pack must mask it there too.
ITEM_NAME = "Large pizza, call 415-555-0123 at the door"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """The story starts 402 days ago and ends now, and its events are stamped with this clock's
    time (the library stamps them with the real time). It never runs ahead of the real time: the
    sandbox processor lets an authorization lapse a week after that."""
    manual = ManualClock(datetime.now(UTC) - timedelta(days=402))
    monkeypatch.setattr(eventsourcing.domain, "datetime_now_with_tzinfo", manual.now)
    return manual


@contextmanager
def reading_as(database_url: str, scope: Scope) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
    """A cursor as the read views give one: the reader role, the scope's settings, one transaction."""
    with psycopg.connect(database_url) as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SET LOCAL ROLE {READER_ROLE}")
        cur.execute("SELECT set_config('app.role', %s, true), set_config('app.merchant_id', %s, true)",
                    (scope.role, str(scope.merchant_id or "")))
        yield cur


def open_order(ledger: Ledger, merchant_id: UUID, tag: str, *, amount_minor: int = 2_500, phone: str = PHONE,
               item_name: str = "Large pizza") -> UUID:
    result = ledger.open_session(
        f"{tag}-open", merchant_id=merchant_id, amount_minor=amount_minor, currency="USD", customer_phone=phone,
        order_reference=f"ORDER-{tag}",
        line_items=[{"sku": "PZ-L", "name": item_name, "quantity": 1, "unit_amount_minor": amount_minor}],
        voice_platform="alexa", conversation_id=f"conv-{tag}", callback_url="https://voice.example/callback",
    )
    return UUID(result.result["session_id"])


def paid(ledger: Ledger, merchant_id: UUID, tag: str, *, phone: str = PHONE, last4: str = "4242",
         capture: bool = True, fingerprint: str | None = None, ip: str | None = None) -> UUID:
    """A session paid by card without a hitch, authorized and (unless told) captured."""
    session_id = open_order(ledger, merchant_id, tag, phone=phone)
    link = ledger.send_link(f"{tag}-send", session_id)
    ledger.open_link(f"{tag}-link", session_id, link.link_token, ip=ip)
    ledger.verify_code(f"{tag}-code", session_id, link.code)
    payment_id = UUID(ledger.attach_payment_method(f"{tag}-attach", session_id, card_token=f"tok_{tag}",
                                                   card_brand="visa", card_last4=last4,
                                                   card_fingerprint=fingerprint).result["payment_id"])
    ledger.authorize_payment(payment_id)
    if capture:
        ledger.capture_payment(f"{tag}-capture", payment_id)
    return payment_id


@dataclass(frozen=True)
class World:
    merchant: UUID
    other_merchant: UUID
    payment: UUID  # the disputed purchase: a wrong code first, an identity check, captured
    session: UUID
    prior: list[UUID]  # the same phone and card, captured, undisputed, within the year: newest first
    disputed: UUID  # the same phone and card, within the year, with a dispute
    left_out: dict[str, UUID]  # the rest, each for its reason
    card: VaultedCard  # the payment's card, through the vault as the payment page puts it there
    personal: PersonalDataReader  # opens what the customers' keys sealed, as the API's read views do


@pytest.fixture
def world(ledger: Ledger, clock: ManualClock, database_url: str, settings: Settings) -> World:
    m, m2 = new_merchant(ledger, "m1"), new_merchant(ledger, "m2")
    too_old = paid(ledger, m, "old")
    clock.advance(timedelta(days=100))
    prior_1 = paid(ledger, m, "prior1")
    clock.advance(timedelta(days=1))
    prior_2 = paid(ledger, m, "prior2")
    disputed = paid(ledger, m, "disputed")
    clock.advance(timedelta(hours=1))
    # The same card (its fingerprint) from another phone: the same customer's card, listed.
    assert settings.vault_key is not None
    fingerprint_vault = CardVault(database_url, settings.vault_key)
    try:
        same_card = fingerprint_vault.tokenize(CARD_NUMBER, 12, clock.now().year + 3, now=clock.now())
    finally:
        fingerprint_vault.close()
    prior_card = paid(ledger, m, "prior-card", phone=OTHER_PHONE, fingerprint=same_card.fingerprint)
    clock.advance(timedelta(hours=1))
    # Another phone and card, but the page opened from the same address: listed, sharing the IP.
    prior_ip = paid(ledger, m, "prior-ip", phone=OTHER_PHONE, last4="4444", ip="203.0.113.7")
    left_out = {
        "too old": too_old,
        "another card": paid(ledger, m, "card", last4="4444"),
        "another phone": paid(ledger, m, "phone", phone=OTHER_PHONE),
        "not captured": paid(ledger, m, "uncaptured", capture=False),
        "another merchant": paid(ledger, m2, "elsewhere"),
    }
    clock.advance(timedelta(days=300))  # prior 1 is 301 days before the payment, "too old" 401

    session = open_order(ledger, m, "disputed-purchase", amount_minor=15_000, item_name=ITEM_NAME)
    link = ledger.send_link("dp-send", session)
    ledger.open_link("dp-link", session, link.link_token, ip="203.0.113.7", user_agent="Mozilla/5.0 (iPhone)")
    wrong = "000000" if link.code != "000000" else "111111"
    assert ledger.verify_code("dp-wrong", session, wrong).result["code_check"] != "verified"
    assert ledger.verify_code("dp-code", session, link.code).result["code_check"] == "verified"
    ledger.verify_identity("dp-identity", session, GOOD_IDENTITY)
    assert settings.vault_key is not None
    vault = CardVault(database_url, settings.vault_key)
    try:
        card = vault.tokenize(CARD_NUMBER, 12, clock.now().year + 3, now=clock.now())
    finally:
        vault.close()
    payment = UUID(ledger.attach_payment_method(
        "dp-attach", session, card_token=card.token, card_brand=card.brand, card_last4=card.last4,
        card_fingerprint=card.fingerprint).result["payment_id"])
    ledger.authorize_payment(payment)
    ledger.capture_payment("dp-capture", payment)
    clock.advance(timedelta(days=1))
    left_out["later"] = paid(ledger, m, "later")
    catch_up(database_url, settings)
    return World(m, m2, payment, session, [prior_ip, prior_card, prior_2, prior_1], disputed, left_out, card,
                 personal_data_reader(settings))


def pack_of(database_url: str, world: World, scope: Scope, *, now: datetime,
            disputed: set[UUID] | None = None) -> dict[str, Any] | None:
    with reading_as(database_url, scope) as cur:
        return build_pack(cur, world.payment, disputed={world.disputed} if disputed is None else disputed,
                          now=now, merchant_id=scope.merchant_id, personal=world.personal)


def audit_rows(database_url: str, *aggregate_ids: UUID) -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT position, event_id, event_type, hash, prev_hash FROM audit_log"
                    " WHERE aggregate_id = ANY(%s) ORDER BY position", (list(aggregate_ids),))
        return cur.fetchall()


# -- the pack ----------------------------------------------------------------------------------------


def test_the_timeline_is_the_journey_in_position_order_each_line_an_audit_row(
    world: World, database_url: str, clock: ManualClock
) -> None:
    pack = pack_of(database_url, world, Scope("merchant", world.merchant), now=clock.now())

    assert pack is not None
    rows = audit_rows(database_url, world.session, world.payment)
    timeline = pack["timeline"]
    assert [(t["event_id"], t["position"], t["hash"], t["prev_hash"], t["event_type"]) for t in timeline] == [
        (str(r["event_id"]), r["position"], r["hash"], r["prev_hash"], r["event_type"]) for r in rows]
    assert all(t["hash"] for t in timeline), "the chain covers the whole journey once caught up"
    assert [t["position"] for t in timeline] == sorted(t["position"] for t in timeline)
    journey = [t["event_type"] for t in timeline]
    expected = ["payment_session.opened", "payment_session.link_sent", "payment_session.link_opened",
                "payment_session.code_rejected", "payment_session.code_verified", "payment_session.identity_verified",
                "payment_session.payment_method_attached", "payment.initiated", "payment.risk_assessed",
                "payment.processing_started", "payment.authorized", "payment_session.completed", "payment.captured"]
    assert [e for e in journey if e in expected] == expected

    line = {t["event_type"]: t for t in timeline}
    assert line["payment_session.opened"]["details"]["customer_phone"] == "+1******0123"
    assert line["payment_session.opened"]["details"]["conversation_id"] == "conv-disputed-purchase"
    assert line["payment_session.link_sent"]["what"].endswith("phone ending 0123")
    assert line["payment_session.link_sent"]["details"]["provider_message_id"] == NOT_RECORDED
    assert line["payment_session.link_opened"]["details"] == {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0 (iPhone)"}
    assert line["payment_session.code_verified"]["details"] == {"attempts": 2}
    assert line["payment_session.identity_verified"]["details"]["verifier"] == "dev-identity"
    assert line["payment.initiated"]["details"]["card_last4"] == "4242"
    assert line["payment.risk_assessed"]["details"]["decision"] == "approve"
    assert line["payment.authorized"]["details"]["processor"] == "sandbox"
    assert line["payment.captured"]["details"]["amount_minor"] == 15_000

    summary = pack["payment"]
    assert summary["payment_id"] == str(world.payment)
    # The card's fingerprint per merchant: the vault's own never shows (it would link merchants' cards).
    assert summary["card"] == {"brand": "visa", "last4": "4242",
                               "fingerprint": card_fingerprint_hash(world.merchant, world.card.fingerprint)}
    assert summary["customer_phone"] == "+1******0123"
    assert (summary["status"], summary["captured_minor"]) == ("captured", 15_000)
    assert pack["merchant_id"] == str(world.merchant)
    assert pack["generated_at"] == clock.now().isoformat()
    assert pack["verify"] == "echotransact audit verify"
    assert {m["fact"] for m in pack["not_recorded"]} >= {"authorization code", "device"}


def test_no_full_phone_or_card_number_anywhere_in_the_pack(world: World, database_url: str,
                                                           clock: ManualClock) -> None:
    pack = pack_of(database_url, world, Scope("merchant", world.merchant), now=clock.now())

    text = json.dumps(pack)
    assert "4155550123" not in text and "555-0123" not in text, "the phone, even typed into an item's name"
    assert "+1******0123" in text
    item = next(t for t in pack["timeline"] if t["event_type"] == "payment_session.opened")["details"]["items"][0]
    assert item["name"] == "Large pizza, call ******0123 at the door"
    assert CARD_NUMBER.replace(" ", "") not in text and CARD_NUMBER not in text
    assert world.card.fingerprint not in text, "the fingerprint links cards across merchants: masked"
    assert world.card.token not in text and "tok_" not in text, "no card token either"


def test_prior_payments_are_the_same_customers_captured_undisputed_ones_of_the_year_before(
    world: World, database_url: str, clock: ManualClock
) -> None:
    pack = pack_of(database_url, world, Scope("merchant", world.merchant), now=clock.now())

    prior = pack["prior_payments"]
    assert [p["payment_id"] for p in prior] == [str(p) for p in world.prior]
    assert [p["shared"] for p in prior] == [["ip"], ["card_fingerprint", "card_brand_last4"],
                                             ["phone_masked", "card_brand_last4"], ["phone_masked", "card_brand_last4"]]
    assert all((p["amount_minor"], p["currency"], p["status"]) == (2_500, "USD", "captured") for p in prior)
    listed = {p["payment_id"] for p in prior}
    assert not listed & {str(p) for p in world.left_out.values()}
    assert str(world.disputed) not in listed

    # Without its dispute, the disputed payment is one more prior payment.
    undisputed = pack_of(database_url, world, Scope("merchant", world.merchant), disputed=set(), now=clock.now())
    assert {p["payment_id"] for p in undisputed["prior_payments"]} == {*listed, str(world.disputed)}


def test_only_a_scope_that_sees_the_payment_gets_its_pack(world: World, database_url: str,
                                                          clock: ManualClock) -> None:
    mine = pack_of(database_url, world, Scope("merchant", world.merchant), now=clock.now())

    assert pack_of(database_url, world, Scope("merchant", world.other_merchant), now=clock.now()) is None
    assert pack_of(database_url, world, Scope("analyst"), now=clock.now()) is None
    assert pack_of(database_url, world, Scope("admin"), now=clock.now()) == mine
    with reading_as(database_url, Scope("admin")) as cur:  # the SQL filter alone, under a scope that sees all
        assert build_pack(cur, world.payment, now=clock.now(), merchant_id=world.other_merchant) is None


# -- the PDF -------------------------------------------------------------------------------------------


def test_the_pdf_opens_and_holds_the_timeline(world: World, database_url: str, clock: ManualClock) -> None:
    pack = pack_of(database_url, world, Scope("merchant", world.merchant), now=clock.now())

    assert pack is not None
    pdf = render_pdf(pack)

    assert pdf.startswith(b"%PDF-")
    reader = PdfReader(io.BytesIO(pdf))
    text = "\n".join(page.extract_text() for page in reader.pages)
    assert "Dispute evidence pack" in text
    assert str(world.payment) in text
    assert "Code verified (attempt 2)" in text
    assert "Identity check passed" in text
    assert "visa ending 4242" in text and "+1******0123" in text
    assert "Risk verdict: approve" in text
    for line in pack["timeline"]:
        assert line["event_id"] in text, line["what"]
        assert line["hash"][:16] in text
    positions = [int(p) for p in re.findall(r"^.* (\d+) [0-9a-f]{16}$", text, flags=re.MULTILINE)]
    assert positions == [line["position"] for line in pack["timeline"]], "the lines in position order"
    for prior in pack["prior_payments"]:
        assert prior["payment_id"] in text
    assert "phone +1******0123, card visa ending 4242" in text, "what the prior payments share"
    assert "echotransact audit verify" in text
    assert "4155550123" not in text and "555-0123" not in text


# -- the pieces --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "shown"), [
    ("call +1 (415) 555-0123", "call *******0123"),
    ("+447700900123", "********0123"),
    ("card 4111 1111 1111 1111 please", "card ************1111 please"),
    ("4155550123", "******0123"),  # ends with the customer's last four
    ("ORDER-20261204-0042", "ORDER-20261204-0042"),  # an order number stays
    ("4111 1111 1111 1112", "4111 1111 1111 1112"),  # fails the Luhn check: not a card number
    ("ORDER-7", "ORDER-7"),
])
def test_scrub_masks_phone_and_card_numbers_in_free_text(written: str, shown: str) -> None:
    assert scrub(written, "0123") == shown


def test_text_the_core_fonts_cannot_draw_is_made_plain() -> None:
    written = "\u201cPizza\u201d \u2013 M\u00fcller\u2019s\u2026 \u65e5\u672c\x07"
    assert latin1(written) == "\"Pizza\" - M\u00fcller's... ?? "
