"""The web console (/console) in headless Chromium (Debian's /usr/bin/chromium, driven by the PyPI
playwright package) against the whole API served by uvicorn on real PostgreSQL and Redis: each
role logs in with its API key, sees what was made through the API, a merchant refunds through
the console and the API shows it, a merchant cannot open another's payment by URL, forged forms
are refused, logout ends the session, and axe-core finds no serious or critical violation on
any page. Screenshots of every page go to the run's temporary folder (and, with
ECHOTRANSACT_SCREENSHOT_DIR set, there too).
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from adapters.clock import ManualClock
from adapters.dev.sandbox_processor import SandboxProcessor
from adapters.dev.servers import ServerURLs
from api.settings import Settings
from tests.api.conftest import Api, make_api, paid_payment, session_body

CHROMIUM = Path(os.environ.get("ECHOTRANSACT_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.exists():
    pytest.skip(f"browser tests need Chromium at {CHROMIUM}: apt-get install -y chromium "
                "(or set ECHOTRANSACT_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="browser tests need the playwright package: pip install playwright"
)
expect = sync_api.expect
# The pages' own timeout (15 s, set per page) does not reach expect(), which keeps 5 s by default.
expect.set_options(timeout=15_000)

AXE = Path(__file__).parent.parent / "assets" / "console" / "axe.min.js"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
               "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# Chromium reports every 4xx document (a refused form is a 403) as a console error; those are expected.
ERROR_STATUS = "Failed to load resource: the server responded with a status of 4"
SCREENSHOT_DIR_ENV = "ECHOTRANSACT_SCREENSHOT_DIR"


# -- one API for the module, with data made through the API --------------------------------------


@pytest.fixture(scope="module")
def api(module_database: str, servers: ServerURLs) -> Iterator[Api]:
    settings = Settings(hash_key=b"h" * 32, master_key=b"m" * 32, encryption_key=b"e" * 32, rate_limit_per_minute=0,
                        topic_prefix=f"console{uuid.uuid4().hex[:10]}")
    yield from make_api(settings, module_database, servers, ManualClock(), SandboxProcessor())


class World:
    def __init__(self, api: Api) -> None:
        # Merchant A: two captured payments and an authorized one; a session opened on another
        # voice platform that goes no further (the funnel's drop-off). Merchant B: one payment.
        self.captured = paid_payment(api, "a", amount=2_500, tag="console-captured", phone="+14155550123")
        self.second = paid_payment(api, "a", amount=1_200, tag="console-second", phone="+14155559876")
        self.authorized = paid_payment(api, "a", amount=900, tag="console-authorized", phone="+14155551111")
        self.other = paid_payment(api, "b", amount=4_200, tag="console-other", phone="+14155552222")
        with api.client("a") as client:
            for payment, key in ((self.captured, "cap-1"), (self.second, "cap-2")):
                response = client.post(f"/v1/payments/{payment}/capture", headers={"Idempotency-Key": key})
                assert response.status_code == 200, response.text
            opened = client.post("/v1/payment-sessions", headers={"Idempotency-Key": "gva-1"}, json=session_body(
                700, voice={"platform": "google_assistant", "conversation_id": "c-2"},
                order={"reference": "ORDER-GVA", "items": [
                    {"sku": "X", "name": "Garlic bread", "quantity": 1, "unit_amount": 700}]}))
            assert opened.status_code == 201, opened.text
        with api.client("b") as client:
            response = client.post(f"/v1/payments/{self.other}/capture", headers={"Idempotency-Key": "cap-b"})
            assert response.status_code == 200, response.text
        api.project()


@pytest.fixture(scope="module")
def world(api: Api) -> World:
    return World(api)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-screenshots")


def screenshot(page: Any, shots: Path, name: str) -> None:
    path = shots / f"console-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if target := os.environ.get(SCREENSHOT_DIR_ENV):
        shutil.copy(path, Path(target) / path.name)


class Browser:
    """A browser context of its own (its own cookies), failing the test on a console error (a CSP
    violation is one) and remembering every URL it asked for."""

    def __init__(self, browser: Any, api: Api, viewport: dict[str, int] = DESKTOP) -> None:
        self.context = browser.new_context(viewport=viewport, base_url=api.url, locale="en-US")
        self.context.add_init_script(path=str(AXE))
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.problems: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", lambda m: self.problems.append(m.text)
                     if m.type == "error" and not m.text.startswith(ERROR_STATUS) else None)
        self.page.on("pageerror", lambda error: self.problems.append(str(error)))
        self.page.on("request", lambda request: self.urls.append(request.url))

    def login(self, key: str) -> None:
        self.page.goto("/console/login")
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Log in").click()
        self.page.wait_for_load_state()
        expect(self.page.get_by_role("button", name="Log out")).to_be_visible()

    def close(self) -> None:
        self.context.close()
        assert self.problems == [], f"console errors (a CSP violation shows here): {self.problems}"


@pytest.fixture
def open_browser(browser: Any, api: Api) -> Iterator[Any]:
    opened: list[Browser] = []

    def make(viewport: dict[str, int] = DESKTOP) -> Browser:
        opened.append(Browser(browser, api, viewport))
        return opened[-1]

    yield make
    for b in opened:
        b.close()


def axe_violations(page: Any) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now."""
    result, passed = page.evaluate(
        "async () => { const r = await axe.run(document);"
        " return [r.violations.map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' '))})),"
        " r.passes.length]; }")
    assert passed > 10, "axe-core checked almost nothing: is the page empty?"
    return [f"{v['id']} ({v['impact']}): {v['nodes'][:3]}" for v in result if v["impact"] in ("serious", "critical")]


def hidden(page: Any, name: str) -> str:
    value: str = page.locator(f"input[name={name}]").first.get_attribute("value")
    return value


# -- merchants ----------------------------------------------------------------------------------------


def test_a_merchant_finds_payments_reads_a_timeline_and_refunds_once(api: Api, world: World, open_browser: Any,
                                                                      shots: Path) -> None:
    b = open_browser()
    page = b.page
    b.login(api.keys["a"])
    expect(page).to_have_url(re.compile(r"/console/payments$"))
    table = page.get_by_role("region", name="Payments table")
    expect(table).to_contain_text("ORDER-1")
    expect(table.locator("tbody tr")).to_have_count(3)  # merchant A's three payments, not B's
    expect(table).not_to_contain_text("42.00 USD")
    screenshot(page, shots, "payments")

    # Search by the last four of the phone, then of the card, then a status, then nothing found.
    page.get_by_label("Phone: last four").fill("9876")
    page.get_by_role("button", name="Search").click()
    expect(table.locator("tbody tr")).to_have_count(1)
    expect(table).to_contain_text("12.00 USD")
    page.goto("/console/payments?card=4242&status=authorized")
    expect(page.get_by_role("region", name="Payments table").locator("tbody tr")).to_have_count(1)
    page.goto("/console/payments?order=NO-SUCH-ORDER")
    expect(page.get_by_role("status")).to_contain_text("No payments match these filters")
    page.goto("/console/payments?card=12")
    expect(page.get_by_role("alert")).to_contain_text("last four digits of the card")

    # One payment: its timeline in words, then a refund with a confirmation step.
    page.goto(f"/console/payments/{world.captured}")
    timeline = page.locator(".timeline")
    expect(timeline).to_contain_text("Authorized for 25.00 USD")
    expect(timeline).to_contain_text("Captured 25.00 USD")
    screenshot(page, shots, "payment")
    page.get_by_role("link", name="Refund…").click()
    expect(page.get_by_role("heading", name="Refund payment")).to_be_visible()
    page.get_by_label("Amount to refund (USD)").fill("10.00")
    page.get_by_label("Reason (optional)").fill("customer asked")
    screenshot(page, shots, "refund-confirm")
    # The same form sent twice (a double click that got past the script): one refund.
    form = {"csrf": hidden(page, "csrf"), "form_id": hidden(page, "form_id"), "amount": "10.00",
            "reason": "customer asked"}
    page.get_by_role("button", name="Confirm: refund payment").click()
    expect(page.get_by_role("status")).to_contain_text("Refund recorded")
    again = page.request.post(f"/console/payments/{world.captured}/refund", form=form, max_redirects=0)
    assert again.status == 303, again.text()

    api.project()
    with api.client("a") as client:
        seen = client.get(f"/v1/payments/{world.captured}").json()
    assert (seen["status"], seen["refunded_amount"]) == ("captured", 1_000), seen
    refunds = [t for t in seen["timeline"] if t["event_type"] == "payment.refunded"]
    assert len(refunds) == 1, refunds
    page.reload()
    expect(page.locator(".timeline")).to_contain_text("Refunded 10.00 USD (customer asked)")

    # A refund beyond what is left is refused in words, and changes nothing.
    page.get_by_role("link", name="Refund…").click()
    page.get_by_label("Amount to refund (USD)").fill("99.00")
    page.get_by_role("button", name="Confirm: refund payment").click()
    expect(page.get_by_role("alert")).to_be_visible()
    with api.client("a") as client:
        assert client.get(f"/v1/payments/{world.captured}").json()["refunded_amount"] == 1_000


def test_a_merchant_captures_through_the_console(api: Api, world: World, open_browser: Any) -> None:
    b = open_browser()
    b.login(api.keys["a"])
    page = b.page
    page.goto(f"/console/payments/{world.authorized}")
    page.get_by_role("link", name="Capture…").click()
    page.get_by_role("button", name="Confirm: capture payment").click()
    expect(page.get_by_role("status")).to_contain_text("Capture recorded")
    api.project()
    with api.client("a") as client:
        assert client.get(f"/v1/payments/{world.authorized}").json()["captured_amount"] == 900


def test_a_merchant_cannot_reach_another_merchants_pages_by_url(api: Api, world: World, open_browser: Any) -> None:
    b = open_browser()
    b.login(api.keys["a"])
    page = b.page
    for path in (f"/console/payments/{world.other}", f"/console/payments/{world.other}/refund"):
        response = page.goto(path)
        assert response.status == 404, path
        expect(page.get_by_role("heading", name="Payment not found")).to_be_visible()
        expect(page.locator("main")).not_to_contain_text("42.00")
    # A forged refund of B's payment with A's own valid token: not found, and nothing moves.
    page.goto("/console/payments")
    forged = page.request.post(f"/console/payments/{world.other}/refund", max_redirects=0, form={
        "csrf": hidden(page, "csrf"), "form_id": "f" * 24, "amount": "1.00"})
    assert forged.status == 404
    with api.client("b") as client:
        assert client.get(f"/v1/payments/{world.other}").json()["refunded_amount"] == 0
    # Pages of other roles are refused by role.
    for path in ("/console/audit", "/console/health", "/console/keys", "/console/analytics"):
        response = page.goto(path)
        assert response.status == 403, path
        expect(page.get_by_role("heading", name="Not available to your role")).to_be_visible()
    # B's cursor is not a page of A's.
    response = page.goto(f"/console/payments?after={world.other}")
    assert response.status == 400


def test_forms_without_the_sessions_token_are_refused(api: Api, world: World, open_browser: Any) -> None:
    b = open_browser()
    b.login(api.keys["a"])
    page = b.page
    page.goto(f"/console/payments/{world.second}/refund")
    form = {"csrf": hidden(page, "csrf"), "form_id": hidden(page, "form_id"), "amount": "1.00"}
    for forged in ({**form, "csrf": "not-the-token"}, {k: v for k, v in form.items() if k != "csrf"}):
        refused = page.request.post(f"/console/payments/{world.second}/refund", form=forged, max_redirects=0)
        assert refused.status == 403
        assert "This form was refused" in refused.text()
    # The right token from another site (the browser says so) is refused too.
    cross = page.request.post(f"/console/payments/{world.second}/refund", form=form, max_redirects=0,
                              headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status == 403
    logout = page.request.post("/console/logout", form={"csrf": "wrong"}, max_redirects=0)
    assert logout.status == 403
    # A login form posted without its cookie's token is refused before the key is looked at.
    with httpx.Client(base_url=api.url) as client:
        refused_login = client.post("/console/login", data={"api_key": api.keys["a"], "csrf": "x"})
        assert refused_login.status_code == 403
        assert "et_console" not in refused_login.headers.get("set-cookie", "").split("et_console_login")[0]
    with api.client("a") as client:
        assert client.get(f"/v1/payments/{world.second}").json()["refunded_amount"] == 0
    # The refused page is shown as a page, in words.
    page.goto(f"/console/payments/{world.second}/refund")
    page.locator("main input[name=csrf]").evaluate("input => input.value = 'stale'")
    page.get_by_role("button", name="Confirm: refund payment").click()
    expect(page.get_by_role("heading", name="This form was refused")).to_be_visible()


def test_the_session_cookie_and_logout(api: Api, world: World, open_browser: Any) -> None:
    b = open_browser()
    page = b.page
    # Keyboard only: the key field has focus, Enter logs in.
    page.goto("/console/login")
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.type(api.keys["a"])
    page.keyboard.press("Enter")
    expect(page.get_by_role("button", name="Log out")).to_be_visible()
    cookies = {c["name"]: c for c in b.context.cookies()}
    session = cookies["et_console"]
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/console"
    assert session["expires"] > datetime.now(UTC).timestamp() + 3600  # an expiry, not a browser session
    assert not session["secure"]  # plain HTTP here; over HTTPS the cookie is Secure
    assert api.keys["a"] not in session["value"]
    assert "et_console_login" not in cookies  # the login form's token is spent
    assert not any(api.keys["a"] in url for url in b.urls), "the key must never be in a URL"
    assert api.keys["a"] not in page.content()

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    expect(page.get_by_role("status")).to_contain_text("You are logged out")
    assert "et_console" not in {c["name"] for c in b.context.cookies()}
    # The old cookie no longer opens anything: the session is gone from the server.
    with httpx.Client(base_url=api.url, cookies={"et_console": session["value"]}) as client:
        response = client.get("/console/payments")
        assert response.status_code == 303 and response.headers["location"] == "/console/login"

    page.get_by_label("API key").fill("et_" + "0" * 32 + "_wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid or was revoked")


# -- analysts, compliance, operators --------------------------------------------------------------------


def test_an_analyst_sees_the_funnel_and_downloads_it(api: Api, world: World, open_browser: Any,
                                                      shots: Path) -> None:
    b = open_browser()
    b.login(api.keys["analyst"])
    page = b.page
    expect(page).to_have_url(re.compile(r"/console/analytics$"))
    chart = page.get_by_role("img", name="Voice-to-mobile funnel, all days")
    expect(chart).to_be_visible()
    expect(page.get_by_role("region", name="Conversion between steps")).to_contain_text("Link sent → Opened")
    platforms = page.get_by_role("region", name="Funnel by voice platform")
    expect(platforms).to_contain_text("alexa")
    expect(platforms).to_contain_text("google_assistant")
    screenshot(page, shots, "funnel")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download CSV").click()
    csv_text = Path(download_info.value.path()).read_text()
    assert csv_text.startswith("section,day,")
    # The world's four alexa sessions were sent their links on one day, or on two if it straddled
    # midnight (UTC): counted over the days.
    alexa_days = [r for r in csv.DictReader(io.StringIO(csv_text))
                  if r["section"] == "funnel" and r["voice_platform_or_currency"] == "alexa"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d", r["day"]) for r in alexa_days), csv_text
    assert sum(int(r["link_sent"]) for r in alexa_days) == 4, csv_text
    assert re.search(r"^volume,\d{4}-\d\d-\d\d,USD,", csv_text, re.M)
    assert "+1" not in csv_text  # no phone, masked or not
    page.goto("/console/analytics?platform=google_assistant")
    expect(page.get_by_role("img", name="Voice-to-mobile funnel, all days")).to_be_visible()
    response = page.goto("/console/analytics?from=2026-02-01&to=2026-01-01")
    assert response.status == 400
    expect(page.get_by_role("alert")).to_contain_text("start date is after the end date")
    assert page.goto("/console/payments").status == 403


def test_compliance_searches_verifies_and_exports_the_audit_trail(api: Api, world: World, open_browser: Any,
                                                                  shots: Path, module_owner_database: str) -> None:
    b = open_browser()
    b.login(api.keys["compliance"])
    page = b.page
    expect(page).to_have_url(re.compile(r"/console/audit$"))
    page.get_by_label("Aggregate id").fill(str(world.captured))
    page.get_by_role("button", name="Search").click()
    rows = page.get_by_role("region", name="Audit rows")
    expect(rows).to_contain_text("payment.captured")
    expect(rows).not_to_contain_text("payment_session.")
    screenshot(page, shots, "audit")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Export (JSON Lines)").click()
    lines = Path(download_info.value.path()).read_text().splitlines()
    assert lines and all(f'"aggregate_id": "{world.captured}"' in line for line in lines)

    page.get_by_role("link", name="Verify the hash chain").click()
    expect(page.get_by_role("status")).to_contain_text("The chain holds")
    screenshot(page, shots, "verify")
    # Tamper with one row (as the tables' owner): the console names the first broken position.
    with psycopg.connect(module_owner_database, autocommit=True) as conn:
        position, data = conn.execute("SELECT position, data FROM audit_log WHERE aggregate_id = %s"
                                      " ORDER BY position LIMIT 1", (world.captured,)).fetchone()  # type: ignore[misc]
        conn.execute("UPDATE audit_log SET data = data || '{\"tampered\": true}' WHERE position = %s", (position,))
        try:
            page.reload()
            expect(page.get_by_role("alert")).to_contain_text(f"broken at position {position}")
        finally:
            conn.execute("UPDATE audit_log SET data = %s WHERE position = %s", (psycopg.types.json.Jsonb(data),
                                                                                 position))
    page.reload()
    expect(page.get_by_role("status")).to_contain_text("The chain holds")
    assert page.goto("/console/keys").status == 403


def test_an_operator_sees_health_and_issues_and_revokes_keys(api: Api, world: World, open_browser: Any,
                                                             browser: Any, shots: Path) -> None:
    admin = open_browser()
    admin.login(api.keys["admin"])
    page = admin.page
    expect(page).to_have_url(re.compile(r"/console/health$"))
    page.get_by_role("link", name="Payments").click()
    # The operator sees every merchant's payments (read only: commands take a merchant's key).
    expect(page.get_by_role("region", name="Payments table")).to_contain_text("42.00 USD")
    page.goto(f"/console/payments/{world.other}")
    expect(page.get_by_role("link", name="Refund…")).to_have_count(0)
    page.get_by_role("link", name="System health").click()
    expect(page.get_by_role("heading", name="Outbox, relay and projections")).to_be_visible()
    expect(page.get_by_role("region", name="Projection lag")).to_contain_text("audit")
    expect(page.locator("main")).to_contain_text("postgres: reachable")
    screenshot(page, shots, "health")

    page.get_by_role("link", name="Merchants & keys").click()
    expect(page.get_by_role("region", name="Merchants table")).to_contain_text("Merchant a")
    page.get_by_label("Role").select_option("merchant")
    page.get_by_label("Merchant (merchant keys only)").select_option(str(api.merchants["a"]))
    page.get_by_label("Label").fill("console-made")
    page.get_by_role("button", name="Issue key").click()
    token = page.get_by_label("API key", exact=True).input_value()
    assert token.startswith("et_")
    screenshot(page, shots, "keys")
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {token}"}) as client:
        assert client.get("/v1/payments").status_code == 200
    # Reloading the page does not show the key again.
    page.goto("/console/keys")
    assert token not in page.content()

    # A merchant logged in with the new key; the operator revokes it; that session ends.
    merchant = open_browser()
    merchant.login(token)
    api.project()
    page.reload()
    page.on("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke key console-made").click()
    expect(page.get_by_role("status")).to_contain_text("Key revoked")
    assert api.services.ledger.authenticate(token) is None
    merchant.page.goto("/console/payments")
    expect(merchant.page).to_have_url(re.compile(r"/console/login$"))


# -- accessibility and phone width, page by page ----------------------------------------------------------


PAGES = {
    "a": ["/console/payments", "/console/payments/{captured}", "/console/payments/{captured}/refund",
          "/console/balances", "/console/payouts", "/console/disputes", "/console/webhooks",
          "/console/webhooks/rotate", "/console/payments?card=12"],
    "analyst": ["/console/analytics"],
    "compliance": ["/console/audit", "/console/audit/verify"],
    "admin": ["/console/health", "/console/keys", "/console/webhooks/rotate"],
}


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_every_page_passes_axe_and_fits_a_phone(api: Api, world: World, open_browser: Any, shots: Path,
                                                viewport: dict[str, int]) -> None:
    login = open_browser(viewport)
    login.page.goto("/console/login")
    assert axe_violations(login.page) == []
    found: dict[str, list[str]] = {}
    for who, paths in PAGES.items():
        b = open_browser(viewport)
        b.login(api.keys[who])
        for path in paths:
            b.page.goto(path.format(captured=world.captured))
            if violations := axe_violations(b.page):
                found[path] = violations
            # No sideways scrolling of the page (wide tables scroll inside their own region), and
            # every control has a label.
            assert b.page.evaluate("document.documentElement.scrollWidth") <= viewport["width"], path
            assert b.page.evaluate("[...document.querySelectorAll('input:not([type=hidden]), select')]"
                                   ".every(i => i.labels.length > 0)"), path
            if viewport == PHONE:
                screenshot(b.page, shots, "phone-" + re.sub(r"[^a-z]+", "-", path.split("?")[0].lower()).strip("-"))
    assert found == {}, found


# -- issue 13's last three: the signing secret's rotation, reasons and the card step, revoked keys ----------


def test_a_merchant_rotates_the_webhook_signing_secret_and_sees_it_once(api: Api, world: World,
                                                                         open_browser: Any, shots: Path) -> None:
    from adapters.notifications.webhooks import webhook_secret

    a, ledger, hash_key = api.merchants["a"], api.services.ledger, api.services.settings.hash_key
    before = ledger.get_merchant(a).webhook_secret_version
    b = open_browser()
    b.login(api.keys["a"])
    page = b.page
    page.goto("/console/webhooks")
    expect(page.get_by_role("region", name="Signing secret")).to_contain_text(f"secret version {before}")
    page.get_by_role("link", name="Rotate signing secret").click()
    # The confirmation step: nothing has changed yet.
    expect(page.get_by_role("heading", name="Rotate signing secret")).to_be_visible()
    assert ledger.get_merchant(a).webhook_secret_version == before
    page.get_by_label("The current secret keeps signing for").select_option("1")
    form_id, csrf = hidden(page, "form_id"), hidden(page, "csrf")
    page.get_by_role("button", name="Confirm: rotate signing secret").click()
    secret = page.get_by_label("New signing secret").input_value()
    after = ledger.get_merchant(a).webhook_secret_version
    assert after == before + 1 and secret == webhook_secret(hash_key, a, after)
    expect(page.get_by_role("status")).to_contain_text(f"Secret version {after} now signs every delivery")
    screenshot(page, shots, "rotated")
    # Shown once: the webhooks page tells of both versions, never the secret.
    page.goto("/console/webhooks")
    expect(page.get_by_role("region", name="Signing secret")).to_contain_text(f"also with version {before}")
    assert secret not in page.content()
    # The same form again (a double click) rotates nothing and shows no secret; without the session's
    # token, or from another site, it is refused.
    again = page.request.post("/console/webhooks/rotate", form={"csrf": csrf, "form_id": form_id,
                                                                "overlap_hours": "1"})
    assert again.status == 200 and "already sent" in again.text() and secret not in again.text()
    forged = page.request.post("/console/webhooks/rotate", form={"csrf": "forged", "form_id": uuid.uuid4().hex,
                                                                 "overlap_hours": "24"})
    assert forged.status == 403
    assert ledger.get_merchant(a).webhook_secret_version == after


def test_an_operator_rotates_a_chosen_merchants_secret(api: Api, world: World, open_browser: Any) -> None:
    from adapters.notifications.webhooks import webhook_secret

    merchant_b, ledger = api.merchants["b"], api.services.ledger
    before = ledger.get_merchant(merchant_b).webhook_secret_version
    b = open_browser()
    b.login(api.keys["admin"])
    page = b.page
    page.goto("/console/webhooks/rotate")
    page.get_by_label("Merchant").select_option(str(merchant_b))
    page.get_by_role("button", name="Confirm: rotate signing secret").click()
    secret = page.get_by_label("New signing secret").input_value()
    assert secret == webhook_secret(api.services.settings.hash_key, merchant_b, before + 1)
    assert ledger.get_merchant(merchant_b).webhook_secret_version == before + 1


def test_a_key_revoked_outside_the_console_ends_its_session_at_once(api: Api, world: World,
                                                                    open_browser: Any) -> None:
    ledger = api.services.ledger
    issued, token = ledger.issue_api_key(f"console-revoke-{uuid.uuid4().hex}", role="merchant",
                                         merchant_id=api.merchants["a"], label="revoked elsewhere")
    b = open_browser()
    b.login(token)
    page = b.page
    expect(page.get_by_role("region", name="Payments table")).to_be_visible()
    cookie = next(c["value"] for c in b.context.cookies() if c["name"] == "et_console")
    # Revoked as the API's admin or the command line would: no console involved.
    ledger.revoke_api_key(f"revoke-{uuid.uuid4().hex}", uuid.UUID(issued.result["key_id"]), reason="left the company")
    page.goto("/console/payments")
    expect(page).to_have_url(re.compile(r"/console/login\?ended=1$"))
    expect(page.get_by_role("status")).to_contain_text("the API key it was made with was revoked")
    assert "et_console" not in {c["name"] for c in b.context.cookies()}
    # The cookie itself is dead too (the session is gone from the server), for every page.
    with httpx.Client(base_url=api.url, cookies={"et_console": cookie}) as client:
        for path in ("/console/payments", "/console/webhooks", "/console/analytics.csv"):
            response = client.get(path)
            assert response.status_code == 303 and response.headers["location"] == "/console/login", path


def test_an_analyst_sees_the_card_step_and_the_decline_reasons(api: Api, world: World, open_browser: Any,
                                                              shots: Path) -> None:
    from tests.api.conftest import customer_link

    # One more session of merchant A whose card the processor declines.
    with api.client("a") as client:
        created = client.post("/v1/payment-sessions", json=session_body(1_300, customer_phone="+14155553333"),
                              headers={"Idempotency-Key": "console-declined-open"})
        assert created.status_code == 201, created.text
    session_id = uuid.UUID(created.json()["id"])
    token, code = customer_link(api, session_id)
    ledger = api.services.ledger
    ledger.open_link("console-declined-link", session_id, token)
    ledger.verify_code("console-declined-code", session_id, code)
    declined = uuid.UUID(ledger.attach_payment_method("console-declined-attach", session_id, card_token="tok_d",
                                                      card_brand="visa", card_last4="0002").result["payment_id"])
    ledger.authorize_payment(declined)
    reason = ledger.get_payment(declined).failure_code
    assert reason  # the sandbox's decline code for the 0002 card
    api.project()

    b = open_browser()
    b.login(api.keys["analyst"])
    page = b.page
    expect(page.locator("#funnel-total-d")).to_contain_text("Card: ")
    expect(page.get_by_role("region", name="Conversion between steps")).to_contain_text("Code verified → Card")
    expect(page.get_by_role("region", name="Conversion between steps")).to_contain_text("Card → Authorized")
    reasons = page.get_by_role("region", name="Reasons by kind")
    expect(reasons).to_contain_text("Declined")
    expect(reasons).to_contain_text(reason)
    screenshot(page, shots, "funnel-reasons")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download CSV").click()
    lines = Path(download_info.value.path()).read_text().splitlines()
    header = lines[0].split(",")
    assert header[-6:] == ["card_attached", "voice_platform", "currency", "reason_kind", "reason", "payments"]
    funnel_rows = [dict(zip(header, line.split(","), strict=True)) for line in lines if line.startswith("funnel,")]
    # Every alexa session of the world attached a card (four paid, this one declined): five.
    assert sum(int(r["card_attached"]) for r in funnel_rows if r["voice_platform_or_currency"] == "alexa") == 5
    reason_rows = [dict(zip(header, line.split(","), strict=True)) for line in lines if line.startswith("reason,")]
    assert [(r["voice_platform"], r["currency"], r["reason_kind"], r["payments"]) for r in reason_rows] == [
        ("alexa", "USD", "decline", "1")]
    assert reason_rows[0]["reason"] == reason

