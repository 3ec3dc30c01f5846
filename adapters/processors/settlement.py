"""Processors' daily settlement reports over HTTP (``GET /v1/settlements/{day}?currency=C``, as
the sandbox processor in adapters/dev/processor_server.py serves them), read into the domain's
SettlementReport and checked whole before anything uses them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

import httpx

from application.errors import ProcessorUnavailable
from domain.reconciliation import Deposit, MalformedReport, ReportLine, SettlementReport


class HttpSettlementReports:
    def __init__(self, processors: Mapping[str, str], *, timeout_s: float = 10.0) -> None:
        """``processors``: name -> base URL, the same as the payment calls use."""
        self.processors = dict(processors)
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def fetch(self, processor: str, day: date, currency: str) -> SettlementReport:
        base_url = self.processors.get(processor)
        if base_url is None:
            known = ", ".join(sorted(self.processors)) or "none"
            raise ValueError(f"no processor named {processor!r} (configured: {known})")
        url = f"{base_url.rstrip('/')}/v1/settlements/{day.isoformat()}"
        try:
            response = self._client.get(url, params={"currency": currency})
        except httpx.HTTPError as error:
            raise ProcessorUnavailable(f"{processor}'s settlement report could not be fetched: {error}") from None
        if response.status_code >= 500 or response.status_code == 429:
            raise ProcessorUnavailable(f"{processor} answered {response.status_code} for its settlement report")
        if response.status_code != 200:
            raise MalformedReport(f"{processor} refused the settlement report request: {response.status_code} "
                                  f"{response.text[:200]}")
        try:
            body = response.json()
        except ValueError:
            raise MalformedReport(f"{processor}'s settlement report is not JSON") from None
        report = parse_report(processor, body)
        if report.day != day or report.currency != currency:
            raise MalformedReport(f"asked for {day} in {currency}, {processor} answered {report.day} in "
                                  f"{report.currency}")
        report.check()
        return report


def parse_report(processor: str, body: Any) -> SettlementReport:
    """The report's JSON as the domain's SettlementReport; MalformedReport names what is wrong."""
    try:
        lines = tuple(
            ReportLine(
                processor_reference=_text(line, "reference"), kind=_text(line, "type"),
                gross_minor=_integer(line, "gross"), fee_minor=_integer(line, "fee"), net_minor=_integer(line, "net"),
                deposit_id=_text(line, "deposit_id"),
                transaction_day=date.fromisoformat(_text(line, "transaction_date")),
            )
            for line in body["lines"]
        )
        deposits = tuple(Deposit(_text(d, "deposit_id"), _integer(d, "total")) for d in body["deposits"])
        final = body.get("final", True)
        if not isinstance(final, bool):
            raise TypeError(f"final must be true or false, not {final!r}")
        return SettlementReport(processor, date.fromisoformat(_text(body, "date")), _text(body, "currency"),
                                lines, deposits, final=final)
    except (KeyError, TypeError, ValueError) as error:
        raise MalformedReport(f"{processor}'s settlement report cannot be read: {type(error).__name__}: {error}") \
            from None


def _text(row: Any, name: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    return value


def _integer(row: Any, name: str) -> int:
    value = row[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer in minor units, not {value!r}")
    return value
