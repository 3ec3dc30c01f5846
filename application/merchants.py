"""Use cases of the merchant: register one, change its settings, rotate its webhook signing secret."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from application.errors import NotFound
from application.unit_of_work import CommandResult, LedgerBase
from domain.ledger import FeeSchedule
from domain.merchant import WEBHOOK_SECRET_OVERLAP, Merchant


class MerchantCommands(LedgerBase):
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
                payout_schedule=changes.get("payout_schedule"),
                settlement_currency=changes.get("settlement_currency"),
                reserve=_reserve(merchant, changes),
            )
            return [merchant], {"merchant_id": str(merchant_id)}

        return self._execute(
            command_id, "change_merchant_settings", {"merchant_id": str(merchant_id), **changes},
            merchant_id, decide,
        )

    def rotate_webhook_secret(
        self, command_id: str, merchant_id: UUID, *, overlap: timedelta = WEBHOOK_SECRET_OVERLAP,
        acting_for: UUID | None = None,
    ) -> CommandResult:
        """A new webhook signing secret version; the previous one keeps signing for ``overlap``.
        The result names the version, never the secret: the caller derives it to show it once
        (adapters/notifications/webhooks.py ``webhook_secret``), so no record holds it.
        ``acting_for``: the merchant a merchant's key acts for; another merchant is not found."""
        if acting_for is not None and acting_for != merchant_id:
            raise NotFound(f"no merchant {merchant_id}")

        def decide() -> tuple[Sequence[Aggregate], dict[str, Any]]:
            merchant = self.get_merchant(merchant_id)
            merchant.rotate_webhook_secret(self.clock.now(), overlap)
            assert merchant.previous_webhook_secret_valid_until is not None
            return [merchant], {
                "merchant_id": str(merchant_id), "secret_version": merchant.webhook_secret_version,
                "previous_secret_valid_until": merchant.previous_webhook_secret_valid_until.isoformat(),
            }

        request = {"merchant_id": str(merchant_id), "overlap_s": overlap.total_seconds()}
        return self._execute(command_id, "rotate_webhook_secret", request, merchant_id, decide)


def _reserve(merchant: Merchant, changes: Mapping[str, Any]) -> tuple[int, int] | None:
    """The reserve after the change, when either of its two settings is given."""
    if "reserve_percent_bps" not in changes and "reserve_days" not in changes:
        return None
    return (changes.get("reserve_percent_bps", merchant.reserve_percent_bps),
            changes.get("reserve_days", merchant.reserve_days))
