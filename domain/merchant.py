"""The Merchant aggregate: who gets paid, what they pay us, where we tell them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import InvalidField, MerchantInactive, MerchantLimitExceeded
from domain.ledger import FeeSchedule
from domain.money import check_amount, check_currency
from domain.payout import DAILY, check_reserve, check_schedule
from domain.values import check_text, check_url

# How long the previous webhook signing secret keeps signing after a rotation, by default and at most:
# a day lets a merchant deploy the new one without dropping a delivery; a week bounds the exposure
# of a secret that was rotated because it leaked.
WEBHOOK_SECRET_OVERLAP = timedelta(hours=24)
MAX_WEBHOOK_SECRET_OVERLAP = timedelta(days=7)


def check_limits(limits: Mapping[str, int]) -> dict[str, int]:
    """Risk limits: the largest single payment per currency, in minor units."""
    if not isinstance(limits, Mapping):
        raise InvalidField("risk limits must be an object of currency -> max amount", field="limits")
    return {check_currency(c): check_amount(v, c) for c, v in limits.items()}


class Merchant(Aggregate):
    # Payout settings, changed with change_settings (merchants registered before payouts existed
    # have these defaults): the schedule, and a rolling reserve (none by default).
    payout_schedule = DAILY
    reserve_percent_bps = 0
    reserve_days = 0
    # The currency it is paid out in; None: each payment's own.
    settlement_currency = None
    # The webhook signing secret's version (the secret itself is derived from it and never
    # recorded: adapters/notifications/webhooks.py): merchants registered before rotation existed
    # are at version 1, whose secret is the one they always had. After a rotation, the previous
    # version still signs (beside the new one) until ``previous_webhook_secret_valid_until``.
    webhook_secret_version = 1
    previous_webhook_secret_valid_until: datetime | None = None

    class Registered(Aggregate.Created):
        name: str
        fee_percent_bps: int
        fee_fixed_minor: int
        webhook_url: str | None
        commerce_backend_uri: str | None
        max_amount_minor: dict[str, int]

    class SettingsChanged(Aggregate.Event):
        changes: dict[str, Any]

    class Deactivated(Aggregate.Event):
        reason: str

    class WebhookSecretRotated(Aggregate.Event):
        """The webhook signing secret moved to ``version``; the previous version's secret stays
        valid (deliveries carry both signatures) until ``previous_valid_until``. Never the secret."""

        version: int
        previous_valid_until: datetime

    @classmethod
    def register(
        cls,
        merchant_id: UUID,
        *,
        name: str,
        fee_schedule: FeeSchedule | None = None,
        webhook_url: str | None = None,
        commerce_backend_uri: str | None = None,
        max_amount_minor: Mapping[str, int] | None = None,
    ) -> Merchant:
        fees = fee_schedule or FeeSchedule()
        return cls._create(
            cls.Registered,
            id=merchant_id,
            name=check_text("name", name),
            fee_percent_bps=fees.percent_bps,
            fee_fixed_minor=fees.fixed_minor,
            webhook_url=check_url("webhook_url", webhook_url),
            commerce_backend_uri=check_url("commerce_backend_uri", commerce_backend_uri),
            max_amount_minor=check_limits(max_amount_minor or {}),
        )

    @event(Registered)
    def __init__(
        self,
        *,
        name: str,
        fee_percent_bps: int,
        fee_fixed_minor: int,
        webhook_url: str | None,
        commerce_backend_uri: str | None,
        max_amount_minor: dict[str, int],
    ) -> None:
        self.name = name
        self.fee_percent_bps = fee_percent_bps
        self.fee_fixed_minor = fee_fixed_minor
        self.webhook_url = webhook_url
        self.commerce_backend_uri = commerce_backend_uri
        self.max_amount_minor = dict(max_amount_minor)
        self.active = True

    @property
    def merchant_id(self) -> UUID:
        return self.id

    @property
    def fee_schedule(self) -> FeeSchedule:
        return FeeSchedule(self.fee_percent_bps, self.fee_fixed_minor)

    def check_can_accept(self, amount_minor: int, currency: str) -> None:
        if not self.active:
            raise MerchantInactive(f"merchant {self.id} is deactivated")
        limit = self.max_amount_minor.get(currency)
        if limit is not None and amount_minor > limit:
            raise MerchantLimitExceeded(
                f"amount {amount_minor} exceeds this merchant's limit of {limit} {currency}",
                limit=limit,
            )

    def change_settings(
        self,
        *,
        name: str | None = None,
        fee_schedule: FeeSchedule | None = None,
        webhook_url: str | None = None,
        commerce_backend_uri: str | None = None,
        max_amount_minor: Mapping[str, int] | None = None,
        payout_schedule: str | None = None,
        reserve: tuple[int, int] | None = None,
        settlement_currency: str | None = None,
    ) -> None:
        """``reserve``: (percent in basis points, days), or (0, 0) for none.
        ``settlement_currency``: a currency to be paid out in, or "" for each payment's own."""
        changes: dict[str, Any] = {}
        if settlement_currency is not None:
            changes["settlement_currency"] = check_currency(settlement_currency) if settlement_currency else None
        if payout_schedule is not None:
            changes["payout_schedule"] = check_schedule(payout_schedule)
        if reserve is not None:
            changes["reserve_percent_bps"], changes["reserve_days"] = check_reserve(*reserve)
        if name is not None:
            changes["name"] = check_text("name", name)
        if fee_schedule is not None:
            changes["fee_percent_bps"] = fee_schedule.percent_bps
            changes["fee_fixed_minor"] = fee_schedule.fixed_minor
        if webhook_url is not None:
            changes["webhook_url"] = check_url("webhook_url", webhook_url)
        if commerce_backend_uri is not None:
            changes["commerce_backend_uri"] = check_url("commerce_backend_uri", commerce_backend_uri)
        if max_amount_minor is not None:
            changes["max_amount_minor"] = check_limits(max_amount_minor)
        changes = {k: v for k, v in changes.items() if getattr(self, k) != v}
        if changes:
            self._settings_changed(changes=changes)

    @event(SettingsChanged)
    def _settings_changed(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            setattr(self, key, value)

    def deactivate(self, reason: str) -> None:
        if self.active:
            self._deactivated(reason=check_text("reason", reason))

    @event(Deactivated)
    def _deactivated(self, reason: str) -> None:
        self.active = False

    def rotate_webhook_secret(self, now: datetime, overlap: timedelta = WEBHOOK_SECRET_OVERLAP) -> None:
        """A new signing secret. Receivers switch to it within ``overlap``, during which every
        delivery is signed with both the new and the previous secret; a version older than the
        previous one stops at once (two at most, as the signature header keeps it simple)."""
        if not self.active:
            raise MerchantInactive(f"merchant {self.id} is deactivated")
        if not isinstance(overlap, timedelta) or not timedelta(0) <= overlap <= MAX_WEBHOOK_SECRET_OVERLAP:
            raise InvalidField(
                f"the overlap must be between 0 and {MAX_WEBHOOK_SECRET_OVERLAP.days} days", field="overlap_s"
            )
        self._webhook_secret_rotated(version=self.webhook_secret_version + 1, previous_valid_until=now + overlap)

    @event(WebhookSecretRotated)
    def _webhook_secret_rotated(self, version: int, previous_valid_until: datetime) -> None:
        self.webhook_secret_version = version
        self.previous_webhook_secret_valid_until = previous_valid_until
