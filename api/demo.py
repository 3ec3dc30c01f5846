"""``echotransact demo``: one complete voice payment against the running system, driven as a
voice platform and a customer would, then the timeline from the read side.

The voice platform opens a session over the API; the customer reads the SMS (the development
mailbox), opens the payment page, enters the code and pays with a test card; the merchant
captures; the read side shows what happened.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from adapters.messages import dev_inbox

HIDDEN = re.compile(r'<input[^>]*name="(csrf|form_id)"[^>]*value="([^"]*)"|'
                    r'<input[^>]*value="([^"]*)"[^>]*name="(csrf|form_id)"')


class DemoError(Exception):
    pass


def _hidden_fields(html: str) -> dict[str, str]:
    fields = {}
    for a_name, a_value, b_value, b_name in HIDDEN.findall(html):
        fields[a_name or b_name] = a_value or b_value
    if set(fields) != {"csrf", "form_id"}:
        raise DemoError("the payment page's form did not carry its csrf and form_id fields")
    return fields


def run_demo(api_url: str, database_url: str, merchant_key: str, say: Callable[[str], None]) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    api = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {merchant_key}"}, timeout=30)
    page = httpx.Client(base_url=api_url, timeout=30, follow_redirects=True)
    phone = "+1415555" + f"{int(run, 16) % 10_000:04d}"

    say("voice platform: the customer ordered two pizzas; opening a payment session")
    created = api.post("/v1/payment-sessions", headers={"Idempotency-Key": f"demo-{run}"}, json={
        "amount": 3_150, "currency": "USD", "customer_phone": phone,
        "order": {"reference": f"DEMO-{run}", "items": [
            {"sku": "PZ-L", "name": "Large margherita", "quantity": 1, "unit_amount": 1_900},
            {"sku": "PZ-S", "name": "Small pepperoni", "quantity": 1, "unit_amount": 1_250}]},
        "voice": {"platform": "demo-assistant", "conversation_id": f"call-{run}"}})
    if created.status_code != 201:
        raise DemoError(f"opening the session failed: {created.status_code} {created.text}")
    session = created.json()
    say(f"  session {session['id']}: {session['status']}")

    say("customer: waiting for the text message")
    deadline = time.monotonic() + 30
    while not (messages := dev_inbox(database_url, to=phone)):
        if time.monotonic() > deadline:
            raise DemoError("no SMS arrived within 30 s (is `echotransact dispatch` running?)")
        time.sleep(0.5)
    found = re.search(r"(/pay/\S+) - your code is (\d{6})", messages[0]["body"])
    if not found:
        raise DemoError("the SMS did not hold a link and a code")
    link, code = found.groups()
    say(f"  SMS: {messages[0]['body']}")

    say("customer: opening the link and entering the code")
    summary = page.get(link)
    summary.raise_for_status()
    card_page = page.post(f"{link}/code", data={"code": code, **_hidden_fields(summary.text)})
    if "card_number" not in card_page.text:
        raise DemoError(f"the code was not accepted ({card_page.status_code})")

    say("customer: paying with the test card 4242 4242 4242 4242")
    expiry = f"12/{(time.gmtime().tm_year + 3) % 100:02d}"
    done = page.post(f"{link}/card", data={"card_number": "4242 4242 4242 4242", "expiry": expiry, "cvv": "123",
                                           **_hidden_fields(card_page.text)})
    if done.status_code != 200:
        raise DemoError(f"the payment did not go through ({done.status_code})")

    status = api.get(f"/v1/payment-sessions/{session['id']}",
                     params={"wait_for_position": session["position"]}).json()
    say(f"voice platform: session is {status['status']}")
    payment_id = status["payment_id"]
    if not payment_id:
        raise DemoError(f"the session has no payment ({status['status']})")

    say("merchant: capturing the payment")
    captured = api.post(f"/v1/payments/{payment_id}/capture", headers={"Idempotency-Key": f"demo-cap-{run}"})
    if captured.status_code != 200:
        raise DemoError(f"capture failed: {captured.status_code} {captured.text}")

    say("read side: the payment's timeline")
    deadline = time.monotonic() + 30
    while True:
        read = api.get(f"/v1/payments/{payment_id}")
        if read.status_code == 200 and read.json()["status"] == "captured":
            break
        if time.monotonic() > deadline:
            raise DemoError("the read side did not show the capture within 30 s (is the worker running?)")
        time.sleep(0.5)
    payment = read.json()
    for entry in payment["timeline"]:
        say(f"  v{entry['version']}  {entry['occurred_at']}  {entry['event_type']}")
    say(f"captured {payment['captured_amount']} {payment['currency']} minor units, fee {payment['fee']}")
    return payment
