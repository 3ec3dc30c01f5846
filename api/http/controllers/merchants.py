"""Admins: merchants and their API keys; admins and the merchant itself: rotating its webhook
signing secret."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any
from uuid import UUID

import anyio
import msgspec
from litestar import Controller, Request, Response, get, patch, post
from msgspec import Meta, Struct

from adapters.notifications.webhooks import webhook_secret
from api.http import schemas
from api.http.auth import Principal, require
from api.http.commands import run_command
from api.http.openapi import command, problems
from api.http.problems import ApiProblem
from api.http.services import ApiServices
from application.errors import NotFound
from domain.merchant import MAX_WEBHOOK_SECRET_OVERLAP, WEBHOOK_SECRET_OVERLAP, Merchant


class WebhookSecretRotate(schemas.Strict):
    overlap_s: Annotated[int, Meta(ge=0, le=int(MAX_WEBHOOK_SECRET_OVERLAP.total_seconds()), description=(
        "how long the previous secret keeps signing beside the new one (seconds)"))] = int(
        WEBHOOK_SECRET_OVERLAP.total_seconds())


class WebhookSecretRotated(Struct):
    merchant_id: str
    secret_version: int
    previous_secret_valid_until: str
    # Shown in this response only (and in its replay under the same Idempotency-Key): derived from
    # the version, never stored, not even in the idempotency record.
    secret: str


def merchant_out(merchant: Merchant) -> schemas.Merchant:
    return schemas.Merchant(
        id=str(merchant.id), name=merchant.name,
        fee_schedule=schemas.FeeSchedule(percent_bps=merchant.fee_percent_bps, fixed=merchant.fee_fixed_minor),
        webhook_url=merchant.webhook_url, commerce_backend_uri=merchant.commerce_backend_uri,
        max_amount=dict(merchant.max_amount_minor), active=merchant.active,
        payout_schedule=merchant.payout_schedule,
        reserve=schemas.Reserve(percent_bps=merchant.reserve_percent_bps, days=merchant.reserve_days),
        settlement_currency=merchant.settlement_currency,
    )


class MerchantController(Controller):
    path = "/v1/merchants"
    tags = ["admin"]  # noqa: RUF012  (Litestar's layer attribute)

    @post("/", operation_id="createMerchant", status_code=201, summary="Onboard a merchant",
          responses=command(201, schemas.Merchant, "the new merchant"))
    async def create(self, request: Request[Any, Any, Any], data: schemas.MerchantCreate,
                     services: ApiServices, principal: Principal) -> Response[bytes]:
        require(principal, "admin")
        fees = data.fee_schedule or schemas.FeeSchedule(percent_bps=290, fixed=30)

        def run(command_id: str) -> tuple[int, Any]:
            result = services.ledger.register_merchant(
                command_id, name=data.name, fee_percent_bps=fees.percent_bps, fee_fixed_minor=fees.fixed,
                webhook_url=data.webhook_url, commerce_backend_uri=data.commerce_backend_uri,
                max_amount_minor=data.max_amount,
            )
            return 201, merchant_out(services.ledger.get_merchant(UUID(result.result["merchant_id"])))

        return await run_command(request, services, principal, data, run)

    @get("/{merchant_id:uuid}", operation_id="getMerchant", summary="A merchant's settings",
         responses=problems())
    async def read(self, merchant_id: UUID, services: ApiServices, principal: Principal) -> schemas.Merchant:
        require(principal, "admin")
        try:
            merchant = await anyio.to_thread.run_sync(services.ledger.get_merchant, merchant_id)
        except NotFound:
            raise ApiProblem(404, "not_found", f"no merchant {merchant_id}") from None
        return merchant_out(merchant)

    @patch("/{merchant_id:uuid}", operation_id="updateMerchant",
           summary="Change webhook URL, commerce URI, fee schedule, limits, payout schedule or reserve",
           responses=command(200, schemas.Merchant, "the merchant as changed"))
    async def update(self, request: Request[Any, Any, Any], merchant_id: UUID, data: schemas.MerchantUpdate,
                     services: ApiServices, principal: Principal) -> Response[bytes]:
        require(principal, "admin")
        changes: dict[str, Any] = {
            k: v for k, v in {"name": data.name, "webhook_url": data.webhook_url,
                              "commerce_backend_uri": data.commerce_backend_uri,
                              "max_amount_minor": data.max_amount}.items() if v is not None
        }
        if data.fee_schedule is not None:
            changes["fee_percent_bps"] = data.fee_schedule.percent_bps
            changes["fee_fixed_minor"] = data.fee_schedule.fixed
        if data.payout_schedule is not None:
            changes["payout_schedule"] = data.payout_schedule
        if data.settlement_currency is not None:
            changes["settlement_currency"] = data.settlement_currency
        if data.reserve is not None:
            changes["reserve_percent_bps"] = data.reserve.percent_bps
            changes["reserve_days"] = data.reserve.days

        def run(command_id: str) -> tuple[int, Any]:
            services.ledger.change_merchant_settings(command_id, merchant_id, **changes)
            return 200, merchant_out(services.ledger.get_merchant(merchant_id))

        return await run_command(request, services, principal, data, run)

    @post("/{merchant_id:uuid}/keys", operation_id="createMerchantKey", status_code=201,
          summary="Issue an API key for this merchant (shown once)",
          responses=command(201, schemas.KeyIssued, "the key, shown only in this response"))
    async def create_key(self, request: Request[Any, Any, Any], merchant_id: UUID, data: schemas.KeyCreate,
                         services: ApiServices, principal: Principal) -> Response[bytes]:
        require(principal, "admin")
        if data.role != "merchant":
            raise ApiProblem(422, "invalid_field", "keys issued for a merchant have the merchant role")

        def run(command_id: str) -> tuple[int, Any]:
            result, token = services.ledger.issue_api_key(command_id, role="merchant", merchant_id=merchant_id,
                                                          label=data.label)
            return 201, schemas.KeyIssued(key_id=result.result["key_id"], role="merchant",
                                          merchant_id=str(merchant_id), api_key=token)

        return await run_command(request, services, principal, data, run)

    @post("/{merchant_id:uuid}/webhook-secret/rotate", operation_id="rotateWebhookSecret", status_code=201,
          summary="Rotate the webhook signing secret (the new one shown once; the previous one signs too until"
                  " its overlap ends)",
          responses=command(201, WebhookSecretRotated, "the new secret, shown only in this response"))
    async def rotate_webhook_secret(self, request: Request[Any, Any, Any], merchant_id: UUID,
                                    data: WebhookSecretRotate, services: ApiServices,
                                    principal: Principal) -> Response[bytes]:
        require(principal, "admin", "merchant")

        def run(command_id: str) -> tuple[int, Any]:
            # A merchant's key rotates only its own secret: another merchant is "not found".
            result = services.ledger.rotate_webhook_secret(
                command_id, merchant_id, overlap=timedelta(seconds=data.overlap_s), acting_for=principal.merchant_id)
            return 201, result.result

        response = await run_command(request, services, principal, data, run)
        if response.status_code != 201:
            return response
        # The recorded body names the version only; the secret is derived for the answer.
        body = msgspec.json.decode(response.content)
        rotated = WebhookSecretRotated(
            merchant_id=body["merchant_id"], secret_version=body["secret_version"],
            previous_secret_valid_until=body["previous_secret_valid_until"],
            secret=webhook_secret(services.settings.hash_key, merchant_id, body["secret_version"]))
        return Response(msgspec.json.encode(rotated), status_code=201, media_type="application/json",
                        headers=dict(response.headers))
