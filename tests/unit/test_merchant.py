"""Merchant: registration checks, risk limits, settings changes that record only real changes, API keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest

from domain.errors import (
    AmountTooLarge,
    DomainError,
    InvalidAmount,
    InvalidField,
    MerchantInactive,
    MerchantLimitExceeded,
    UnknownCurrency,
)
from domain.ledger import FeeSchedule
from domain.merchant import Merchant


def register(**overrides: Any) -> Merchant:
    kwargs: dict[str, Any] = {"name": "Pizza Planet"}
    kwargs.update(overrides)
    return Merchant.register(uuid4(), **kwargs)


def test_registration_defaults() -> None:
    merchant = register()
    assert merchant.fee_schedule == FeeSchedule(290, 30)
    assert merchant.active is True
    assert merchant.max_amount_minor == {}
    assert (merchant.webhook_url, merchant.commerce_backend_uri) == (None, None)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"name": ""}, InvalidField),
        ({"name": "n" * 201}, InvalidField),
        ({"webhook_url": "ftp://merchant.example"}, InvalidField),
        ({"commerce_backend_uri": "not a url"}, InvalidField),
        ({"max_amount_minor": {"XXX": 100}}, UnknownCurrency),
        ({"max_amount_minor": {"USD": 0}}, InvalidAmount),
        ({"max_amount_minor": {"JPY": 1_000_001}}, AmountTooLarge),
        ({"max_amount_minor": [("USD", 100)]}, InvalidField),
    ],
    ids=repr,
)
def test_registration_rejections(overrides: dict[str, Any], error: type[DomainError]) -> None:
    with pytest.raises(error):
        register(**overrides)


def test_risk_limit_is_per_currency_and_inclusive() -> None:
    merchant = register(max_amount_minor={"USD": 50_000})
    merchant.check_can_accept(50_000, "USD")
    merchant.check_can_accept(10_000_000, "EUR")  # no limit set for EUR
    with pytest.raises(MerchantLimitExceeded) as caught:
        merchant.check_can_accept(50_001, "USD")
    assert caught.value.details == {"limit": 50_000}


def test_a_deactivated_merchant_accepts_nothing() -> None:
    merchant = register()
    merchant.deactivate("fraud review")
    with pytest.raises(MerchantInactive):
        merchant.check_can_accept(1, "USD")
    merchant.collect_events()
    merchant.deactivate("again")
    assert merchant.collect_events() == []


def test_settings_change_records_only_what_changed() -> None:
    merchant = register(webhook_url="https://merchant.example/hook")
    merchant.collect_events()
    merchant.change_settings(name="Pizza Planet", webhook_url="https://merchant.example/hook")
    assert merchant.collect_events() == []
    merchant.change_settings(name="Pizza Planet", fee_schedule=FeeSchedule(250, 30))
    (changed,) = merchant.collect_events()
    assert getattr(changed, "changes", None) == {"fee_percent_bps": 250}
    assert merchant.fee_schedule == FeeSchedule(250, 30)


def test_replaying_the_events_rebuilds_the_merchant() -> None:
    merchant = register(max_amount_minor={"USD": 50_000})
    merchant.change_settings(webhook_url="https://merchant.example/hook", max_amount_minor={"EUR": 7})
    merchant.deactivate("closed")
    replayed = None
    for event in merchant.collect_events():
        replayed = event.mutate(replayed)
    assert replayed is not None
    assert vars(replayed) == vars(merchant)


def test_api_keys_record_only_a_hash_and_revoke_once() -> None:
    from uuid import uuid4

    from domain.api_key import ApiKey
    from domain.errors import InvalidTransition

    key = ApiKey.issue(uuid4(), role="merchant", merchant_id=uuid4(), key_hash="h" * 64, label="pos")
    key.revoke("leaked")
    with pytest.raises(InvalidTransition):
        key.revoke("again")
    events = key.collect_events()
    assert [type(e).__name__ for e in events] == ["Issued", "Revoked"]
    replayed = None
    for event in events:
        replayed = event.mutate(replayed)
    assert replayed is not None and vars(replayed) == vars(key) and replayed.revoked


@pytest.mark.parametrize(
    ("role", "merchant"), [("root", False), ("merchant", False), ("analyst", True), ("admin", True)]
)
def test_api_key_rejections(role: str, merchant: bool) -> None:
    from uuid import uuid4

    from domain.api_key import ApiKey

    with pytest.raises(InvalidField):
        ApiKey.issue(uuid4(), role=role, merchant_id=uuid4() if merchant else None, key_hash="h")


# -- webhook signing secret rotation ---------------------------------------------------------------


def test_a_new_merchant_signs_with_version_1_and_no_previous_secret() -> None:
    merchant = register()
    assert (merchant.webhook_secret_version, merchant.previous_webhook_secret_valid_until) == (1, None)


def test_rotation_moves_to_the_next_version_and_keeps_the_previous_for_the_overlap() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    merchant = register()
    merchant.rotate_webhook_secret(now)
    assert merchant.webhook_secret_version == 2
    assert merchant.previous_webhook_secret_valid_until == now + timedelta(hours=24)
    merchant.rotate_webhook_secret(now + timedelta(hours=1), timedelta(minutes=5))
    assert merchant.webhook_secret_version == 3
    assert merchant.previous_webhook_secret_valid_until == now + timedelta(hours=1, minutes=5)
    [first, second] = [e for e in merchant.collect_events() if isinstance(e, Merchant.WebhookSecretRotated)]
    assert (first.version, second.version) == (2, 3)
    # The event says which version and until when, never the secret (nor anything like one).
    assert set(vars(second)) - {"originator_id", "originator_version", "timestamp"} == {
        "version", "previous_valid_until"}


def test_replaying_the_rotations_gives_the_same_merchant() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    merchant = register()
    merchant.rotate_webhook_secret(now)
    events = merchant.collect_events()
    copy: Any = None
    for event in events:
        copy = event.mutate(copy)
    assert (copy.webhook_secret_version, copy.previous_webhook_secret_valid_until) == (
        2, merchant.previous_webhook_secret_valid_until)


@pytest.mark.parametrize("overlap_s", [-1, 7 * 86400 + 1])
def test_an_overlap_outside_0_to_7_days_is_refused_and_records_nothing(overlap_s: int) -> None:
    merchant = register()
    merchant.collect_events()
    with pytest.raises(InvalidField) as refused:
        merchant.rotate_webhook_secret(datetime.now(UTC), timedelta(seconds=overlap_s))
    assert refused.value.code == "invalid_field"
    assert merchant.webhook_secret_version == 1 and merchant.collect_events() == []


def test_a_deactivated_merchant_cannot_rotate() -> None:
    merchant = register()
    merchant.deactivate("closed")
    merchant.collect_events()
    with pytest.raises(MerchantInactive):
        merchant.rotate_webhook_secret(datetime.now(UTC))
    assert merchant.webhook_secret_version == 1 and merchant.collect_events() == []
