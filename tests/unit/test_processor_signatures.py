"""Processors' notification signatures (adapters/processors/notifications.py): what verifies, what
does not and why, and the body read into a ProcessorEvent with the bad field named."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from adapters.processors.notifications import (
    TOLERANCE_S,
    InvalidSignature,
    MalformedNotification,
    event_body,
    parse_event,
    sign,
    signature_header,
    verify,
)
from api.settings import ConfigurationError, Settings
from application.disputes import DISPUTE_LOST, DISPUTE_OPENED, EARLY_FRAUD_WARNING, ProcessorEvent

NOW = 1_800_000_000
BODY = b'{"id":"evt_1","type":"dispute.opened"}'
SECRET, OLD_SECRET, OTHER = "whsec_current", "whsec_previous", "whsec_someone_else"


def refused(header: str | None, body: bytes = BODY, secrets: tuple[str, ...] = (SECRET,), now: float = NOW) -> str:
    with pytest.raises(InvalidSignature) as error:
        verify(header, body, secrets, now=now)
    return error.value.reason


def test_a_body_signed_now_with_the_secret_verifies() -> None:
    verify(signature_header(SECRET, BODY, now=NOW), BODY, [SECRET], now=NOW)
    assert signature_header([SECRET, OLD_SECRET], BODY, now=NOW) == f"t={NOW},v1={sign(SECRET, BODY, NOW)}"


def test_the_mac_is_hmac_sha256_over_the_time_a_dot_and_the_raw_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY, NOW) == expected


def test_a_tampered_body_is_refused() -> None:
    header = signature_header(SECRET, BODY, now=NOW)
    assert refused(header, BODY.replace(b"opened", b"won")) == "no signature matches"
    assert refused(header, BODY + b" ") == "no signature matches"  # a byte is a byte: no re-serialising


def test_a_changed_timestamp_breaks_the_signature() -> None:
    mac = sign(SECRET, BODY, NOW)
    assert refused(f"t={NOW + 1},v1={mac}") == "no signature matches"


def test_another_secret_is_refused() -> None:
    assert refused(signature_header(OTHER, BODY, now=NOW)) == "no signature matches"


def test_during_a_rotation_either_current_secret_verifies() -> None:
    rotating = (SECRET, OLD_SECRET)
    verify(signature_header(OLD_SECRET, BODY, now=NOW), BODY, rotating, now=NOW)  # a sender not yet rotated
    verify(signature_header(SECRET, BODY, now=NOW), BODY, rotating, now=NOW)
    # Once the old secret is retired, what it signs is refused.
    assert refused(signature_header(OLD_SECRET, BODY, now=NOW), secrets=(SECRET,)) == "no signature matches"


def test_an_unknown_processor_is_refused_even_for_a_signature_that_would_verify() -> None:
    assert refused(signature_header(SECRET, BODY, now=NOW), secrets=()) == "unknown processor"


@pytest.mark.parametrize("offset_s", [-TOLERANCE_S - 1, TOLERANCE_S + 1, -86_400, 10**6])
def test_stale_and_future_timestamps_are_refused(offset_s: int) -> None:
    header = signature_header(SECRET, BODY, now=NOW + offset_s)
    assert refused(header) == "stale timestamp"


@pytest.mark.parametrize("offset_s", [-TOLERANCE_S, TOLERANCE_S, 0])
def test_the_window_is_tolerance_seconds_each_way_inclusive(offset_s: int) -> None:
    verify(signature_header(SECRET, BODY, now=NOW + offset_s), BODY, [SECRET], now=NOW)


def test_several_v1_verify_when_any_one_matches() -> None:
    good, wrong = sign(SECRET, BODY, NOW), sign(OTHER, BODY, NOW)
    verify(f"t={NOW},v1={wrong},v1={good}", BODY, [SECRET], now=NOW)
    verify(f"t={NOW}, v1={good}, v0=legacy, v2=future", BODY, [SECRET], now=NOW)  # other schemes ignored
    assert refused(f"t={NOW},v1={wrong},v1={sign(OLD_SECRET, BODY, NOW)}") == "no signature matches"


@pytest.mark.parametrize(("header", "reason"), [
    (None, "missing"),
    ("", "missing"),
    ("garbage", "malformed"),
    (f"v1={'a' * 64}", "malformed t"),
    (f"t=,v1={'a' * 64}", "malformed t"),
    (f"t=-5,v1={'a' * 64}", "malformed t"),
    (f"t=1e9,v1={'a' * 64}", "malformed t"),
    (f"t=\uff11\uff12\uff13,v1={'a' * 64}", "malformed t"),  # digits, but not ASCII ones
    (f"t={NOW},t={NOW},v1={'a' * 64}", "malformed t"),
    (f"t={NOW}", "no v1"),
    (f"t={NOW},v0={'a' * 64}", "no v1"),
    (f"t={NOW},v1=zz", "malformed v1"),
    (f"t={NOW},v1={'A' * 64}", "malformed v1"),
    (f"t={NOW},v1={'é' * 64}", "malformed v1"),  # not ASCII: compare_digest would raise, not refuse
    (f"t={NOW}," + ",".join([f"v1={'a' * 64}"] * 9), "too many signatures"),
    (f"t={NOW},v1={'a' * 64}," + "x" * 2_048, "header too long"),
])
def test_a_malformed_header_is_refused_with_its_reason(header: str | None, reason: str) -> None:
    assert refused(header) == reason


# -- the body ---------------------------------------------------------------------------------------


CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def body(**changes: Any) -> dict[str, Any]:
    data = {"payment_reference": "primary_capt_1", "dispute_id": "dp_1", "reason": "fraudulent", "amount": 2_500,
            "currency": "USD", "due_by": "2026-01-09T03:04:05Z"}
    document: dict[str, Any] = {"id": "evt_1", "type": DISPUTE_OPENED, "created": "2026-01-02T03:04:05Z",
                                "data": data}
    for name, value in changes.items():
        if name.startswith("data_"):
            data[name.removeprefix("data_")] = value
        else:
            document[name] = value
    return document


def parsed(document: Any) -> ProcessorEvent:
    return parse_event(json.dumps(document).encode())


def test_a_dispute_opened_is_read_into_the_ledgers_event() -> None:
    assert parsed(body()) == ProcessorEvent(
        event_id="evt_1", type=DISPUTE_OPENED, created_at=CREATED, payment_reference="primary_capt_1",
        dispute_id="dp_1", reason="fraudulent", amount_minor=2_500, currency="USD",
        due_by=CREATED + timedelta(days=7))


def test_times_keep_their_zone_and_compare_as_instants() -> None:
    event = parsed(body(created="2026-01-02T05:04:05+02:00"))
    assert event.created_at == CREATED and event.created_at.utcoffset() == timedelta(hours=2)


def test_a_ruling_and_a_warning_need_only_what_they_say() -> None:
    lost = parsed({"id": "evt_2", "type": DISPUTE_LOST, "created": "2026-01-05T00:00:00Z",
                   "data": {"payment_reference": "primary_capt_1", "dispute_id": "dp_1"}})
    assert (lost.type, lost.dispute_id, lost.amount_minor, lost.reason) == (DISPUTE_LOST, "dp_1", None, None)
    warning = parsed({"id": "evt_3", "type": EARLY_FRAUD_WARNING, "created": "2026-01-01T00:00:00Z",
                      "data": {"payment_reference": "primary_capt_1", "reason": "fraudulent"}})
    assert (warning.dispute_id, warning.reason) == (None, "fraudulent")


def test_event_body_is_what_parse_event_reads() -> None:
    event = parsed(body())
    assert parse_event(event_body(event)) == event
    assert json.loads(event_body(event))["created"] == "2026-01-02T03:04:05Z"


@pytest.mark.parametrize(("document", "field"), [
    (b"", "body"),
    (b"{", "body"),
    (b"[1]", "body"),
    (b"\xff\xfe", "body"),
    (b"[" * 100_000, "body"),
    (body(id=""), "id"),
    (body(id=7), "id"),
    (body(id="x" * 256), "id"),
    (body(type="dispute.reopened"), "type"),
    (body(type=None), "type"),
    (body(created="2026-01-02T03:04:05"), "created"),  # no zone
    (body(created="yesterday"), "created"),
    (body(created=1767323045), "created"),
    (body(data=[]), "data"),
    (body(data_payment_reference=None), "data.payment_reference"),
    (body(data_dispute_id=None), "data.dispute_id"),
    (body(data_reason=None), "data.reason"),
    (body(data_reason="fraud\x00"), "data.reason"),
    (body(data_amount=None), "data.amount"),
    (body(data_amount=0), "data.amount"),
    (body(data_amount=-1), "data.amount"),
    (body(data_amount=25.0), "data.amount"),
    (body(data_amount=True), "data.amount"),
    (body(data_amount=2**63), "data.amount"),
    (body(data_currency="usd"), "data.currency"),
    (body(data_currency=None), "data.currency"),
    (body(data_due_by="next week"), "data.due_by"),
])
def test_a_bad_field_is_named(document: Any, field: str) -> None:
    raw = document if isinstance(document, bytes) else json.dumps(document).encode()
    with pytest.raises(MalformedNotification) as error:
        parse_event(raw)
    assert error.value.field == field


# -- the secrets, from the environment ----------------------------------------------------------------


def test_the_secrets_setting_names_several_per_processor_in_signing_order() -> None:
    settings = Settings.from_env({
        "ECHOTRANSACT_HASH_KEY": base64.b64encode(b"h" * 32).decode(),
        "ECHOTRANSACT_PROCESSOR_WEBHOOK_SECRETS": " primary = new|old==, secondary=only ",
    })
    assert settings.processor_webhook_secrets == {"primary": ("new", "old=="), "secondary": ("only",)}
    assert "new" not in repr(settings)
    assert settings.replace(port=1).processor_webhook_secrets == settings.processor_webhook_secrets


@pytest.mark.parametrize(("value", "says"), [
    ("primary", "entry 1 (no name)"),
    ("primary=", "entry 1 (primary)"),
    ("primary=a||b", "entry 1 (primary)"),
    ("=whsec_leaked", "entry 1 (no name)"),
    ("primary=whsec_leaked,primary=whsec_leaked2", "named twice"),
])
def test_a_bad_secrets_setting_names_the_variable_and_never_a_secret(value: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match="ECHOTRANSACT_PROCESSOR_WEBHOOK_SECRETS") as error:
        Settings.from_env({"ECHOTRANSACT_HASH_KEY": base64.b64encode(b"h" * 32).decode(),
                           "ECHOTRANSACT_PROCESSOR_WEBHOOK_SECRETS": value})
    assert says in str(error.value) and "whsec" not in str(error.value)
