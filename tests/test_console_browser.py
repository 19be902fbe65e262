"""The operator console in a real browser (Debian's chromium, driven by Playwright), against a real API server
on the real broker and a real SQLite database, with the merchant-events and revocations workers running and
the sandbox merchant endpoint and Alipay gateway answering them.

An operator signs in (a wrong key is refused), searches, opens a timeline, replays a dead letter (which then
reaches the merchant), revokes through the confirmation page (the authorization ends canceled), meets the
CSRF check (a page elsewhere that posts to the console) and a key without the scope, and signs out. Each page
is saved as a screenshot under tests/artifacts/console/.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.fernet import Fernet

from authnotify.api.app import create_api_app
from authnotify.api.keys import ApiKeys, NewKey, new_api_key, parse_api_keys
from authnotify.api.server import console_session_key, operator_queues
from authnotify.config import Settings
from authnotify.devtools.sandbox.alipay_gateway import RunningAlipayGateway
from authnotify.devtools.sandbox.merchant_endpoint import RunningMerchantEndpoint, start_merchant_endpoint
from authnotify.domain.authorizations import TokenGrant, Transition
from authnotify.domain.events import activation_events
from authnotify.domain.merchants import generate_secret
from authnotify.messaging.connection import Broker
from authnotify.messaging.deadletters import DeadLetterFilter
from authnotify.messaging.publisher import ConfirmedPublisher
from authnotify.messaging.sending import send_event
from authnotify.messaging.topology import Consumer, build_topology
from authnotify.store import SqlStore
from tests.events_harness import running_workers

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "console"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_SECONDS = 20.0

if importlib.util.find_spec("playwright") is None:  # pragma: no cover - the test extra installs it
    pytest.skip("console browser tests skipped: playwright is not installed (pip install -e '.[test]')",
                allow_module_level=True)
if not CHROMIUM.exists():
    pytest.skip(f"console browser tests skipped: no browser here ({CHROMIUM} missing; .ci/run installs Debian's "
                "chromium)", allow_module_level=True)

pytestmark = pytest.mark.slow


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Stack:
    url: str
    settings: Settings
    store: SqlStore
    publisher: ConfirmedPublisher
    broker: Broker
    merchant: RunningMerchantEndpoint
    keys: dict[str, NewKey]


@pytest.fixture
async def stack(make_settings: Callable[..., Settings], gateway: RunningAlipayGateway,
                tmp_path: Path) -> AsyncIterator[Stack]:
    """A real API server (the composition of ``authnotify api``) on a free port, the merchant-events and
    revocations workers, the sandbox merchant endpoint, and the store they share."""
    merchant = await start_merchant_endpoint(generate_secret())
    registry = tmp_path / "merchants.toml"
    registry.write_text(f'[merchants.default]\nurl = "{merchant.url_for("/hooks")}"\n'
                        f'secret = "{merchant.endpoint.secret}"\n')
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/console.db",
                             token_keys=Fernet.generate_key().decode(), merchants_file=registry,
                             retry_delays="200ms", ams_gateway_url=gateway.url, aps_gateway_url=gateway.url,
                             console_session_key=Fernet.generate_key().decode())
    keys = {name: new_api_key(name, scopes) for name, scopes in {
        "operator": ["authorizations:read", "authorizations:revoke", "dlq:read", "dlq:write", "tokens:read"],
        "dlq-only": ["dlq:read"]}.items()}
    api_keys: ApiKeys = parse_api_keys("".join(key.toml_entry() for key in keys.values()))
    topology = build_topology(settings)
    async with running_workers(settings, Consumer.MERCHANT_EVENTS.value, Consumer.REVOCATIONS.value):
        store = await SqlStore.connect(settings.store_url(), settings.token_keys)
        broker = Broker(settings.broker_url(), topology, connection_name="authnotify-api")
        publisher = ConfirmedPublisher(broker, name="api", confirm_timeout=5.0)
        await publisher.wait_ready(WAIT_SECONDS)
        app = create_api_app(store, publisher, topology, api_keys, operator_queues=operator_queues(settings, broker),
                             session_key=console_session_key(settings))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield Stack(f"http://127.0.0.1:{port}", settings, store, publisher, broker, merchant, keys)
        finally:
            await runner.cleanup()
            await publisher.close()
            await broker.close()
            await store.close()
            await merchant.aclose()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """Debian's chromium with a fresh profile (never a browser Playwright downloads)."""
    from playwright.async_api import async_playwright  # imported here: the fast suite collects this module

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1360, "height": 900})
        context.set_default_timeout(WAIT_SECONDS * 1000)
        try:
            yield context
        finally:
            await context.close()


class Screens:
    """Saves each page as tests/artifacts/console/NN-name.png, and keeps every page's HTML to check for secrets."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.count = 0
        self.html: list[str] = []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for old in ARTIFACTS.glob("*.png"):
            old.unlink()

    async def shoot(self, name: str) -> None:
        self.count += 1
        self.html.append(await self.page.content())
        await self.page.screenshot(path=str(ARTIFACTS / f"{self.count:02d}-{name}.png"), full_page=True)


async def record(store: SqlStore, merchant: str) -> tuple[Transition, str, str, str]:
    """An active Alipay+ authorization, recorded by the real store: (its transition, agreement, access token,
    refresh token)."""
    access, refresh = f"AT{uuid.uuid4().hex}", f"RT{uuid.uuid4().hex}"
    agreement = f"agr-{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC)
    transition = await store.record_tokens(TokenGrant(
        provider="aps", access_token=access, refresh_token=refresh, access_token_expiry_time=now + timedelta(days=20),
        refresh_token_expiry_time=now + timedelta(days=100), auth_client_id="2188120123456789",
        reference_merchant_id=merchant, reference_agreement_id=agreement))
    return transition, agreement, access, refresh


async def dead_letter_through_the_runtime(stack: Stack, merchant: str) -> tuple[str, str]:
    """An authorization whose activation event the merchant refuses on both attempts: merchant-events
    dead-letters it. Returns (authorizationId, webhook-id)."""
    transition, _, _, _ = await record(stack.store, merchant)
    [event] = activation_events(transition, possibly_seen_before=False)
    stack.merchant.endpoint.fail(2, status=503)
    await send_event(stack.publisher, build_topology(stack.settings), event)
    queues = operator_queues(stack.settings, stack.broker)

    async def dead() -> bool:
        listing = await queues.list([Consumer.MERCHANT_EVENTS.value], DeadLetterFilter(), 10)
        return any(letter.id == event.id for letter in listing.items)

    await eventually(dead, "the event to be dead-lettered")
    return transition.authorization.authorizationId or "", event.id


async def test_an_operator_signs_in_searches_replays_a_dead_letter_and_revokes_in_a_real_browser(
        stack: Stack, browser: Any) -> None:
    transition, agreement, access, refresh = await record(stack.store, "M-1")
    authorization_id = transition.authorization.authorizationId
    _, webhook_id = await dead_letter_through_the_runtime(stack, "M-DOWN")
    page = await browser.new_page()
    screens = Screens(page)

    # Signing in: the console sends a signed-out visitor to the form; a wrong key is refused.
    await page.goto(stack.url + "/")
    assert page.url.startswith(stack.url + "/sign-in")
    await screens.shoot("sign-in")
    await page.fill("#key", "ank_this-is-not-a-key")
    await page.click("#sign-in")
    assert "not a key of this API" in await page.inner_text("#sign-in-error")
    await screens.shoot("sign-in-refused")
    await page.fill("#key", stack.keys["operator"].key)
    await page.click("#sign-in")
    await page.wait_for_url(stack.url + "/")
    assert await page.inner_text("#key-name") == "operator"
    await screens.shoot("authorizations")

    # Searching by agreement, then the authorization's page and its timeline.
    await page.fill("#q", agreement)
    await page.click("#search")
    await page.click(f'a[href="/authorizations/{authorization_id}"]')
    await page.wait_for_url(f"{stack.url}/authorizations/{authorization_id}")
    assert await page.inner_text("#status") == "active"
    assert "authorization.activated" in await page.inner_text("#timeline")
    await screens.shoot("authorization")

    # The dead letter, found by its merchant, replayed, and delivered to the merchant this time.
    await page.click('nav a[href="/dead-letters"]')
    row = page.locator(f'tr.dead-letter[data-id="{webhook_id}"]')
    assert "M-DOWN" in await row.inner_text() and "503" in await row.inner_text()
    await page.fill("#merchant", "M-DOWN")
    await page.click("#filter")
    assert await page.locator("tr.dead-letter").count() == 1
    await screens.shoot("dead-letters")
    await page.locator(f'tr.dead-letter[data-id="{webhook_id}"] button.replay-one').click()
    assert "Replayed 1 message of merchant-events" in await page.inner_text("#flash")
    await screens.shoot("dead-letter-replayed")

    async def delivered() -> bool:
        return any(request.webhook_id == webhook_id for request in stack.merchant.endpoint.delivered)

    await eventually(delivered, "the replayed event at the merchant")

    await page.click('nav a[href="/queues"]')
    assert await page.locator("#row-merchant-events").count() == 1
    assert await page.locator("#row-revocations td").nth(4).inner_text() == "1"  # its consumer is running
    await screens.shoot("queues")

    # Revoking: a confirmation first, then the revocations worker revokes at the sandbox gateway.
    await page.goto(f"{stack.url}/authorizations/{authorization_id}")
    await page.click("#revoke")
    assert "Revoke this authorization?" in await page.inner_text("h1")
    await screens.shoot("revoke-confirmation")
    await page.fill("#reason", "merchant closed the account")
    await page.click("#confirm-revoke")
    assert "Revocation queued" in await page.inner_text("#flash")

    async def canceled() -> bool:
        found = await stack.store.get_authorization(authorization_id)
        return found is not None and found.status == "canceled"

    await eventually(canceled, "the authorization to end canceled")
    await page.reload()
    assert await page.inner_text("#status") == "canceled"
    assert "authorization.canceled" in await page.inner_text("#timeline")
    await screens.shoot("revoked")

    # A page elsewhere that posts to the console (the session cookie goes along: same site) is refused.
    other, _, other_access, other_refresh = await record(stack.store, "M-1")
    other_id = other.authorization.authorizationId
    evil = await forged_form_page(f"{stack.url}/authorizations/{other_id}/revoke")
    try:
        await page.goto(evil.url)
        await page.wait_for_url(f"{stack.url}/authorizations/{other_id}/revoke")
        assert "CSRF" in await page.inner_text("#message")
        await screens.shoot("csrf-refused")
    finally:
        await evil.close()
    still = await stack.store.get_authorization(other_id)
    assert still is not None and still.status == "active"

    # Signing out ends the session.
    await page.goto(stack.url + "/queues")
    await page.click(".sign-out button")
    await page.wait_for_url(stack.url + "/sign-in")
    await screens.shoot("signed-out")
    await page.goto(stack.url + "/dead-letters")
    assert page.url.startswith(stack.url + "/sign-in")

    # A key without the scope a page needs is told which one.
    await page.fill("#key", stack.keys["dlq-only"].key)
    await page.click("#sign-in")
    await page.goto(stack.url + "/")
    assert "lacks the scope authorizations:read" in await page.inner_text("#message")
    await screens.shoot("scope-refused")

    for html in screens.html:
        for secret in (access, refresh, other_access, other_refresh, stack.keys["operator"].key,
                       stack.keys["dlq-only"].key):
            assert secret not in html
    assert len(list(ARTIFACTS.glob("*.png"))) >= screens.count


async def test_the_queues_page_refreshes_its_table_on_every_tick(stack: Stack, browser: Any) -> None:
    """The table is re-fetched every 5 s and replaces the one on the page each time, not only the first."""
    page = await browser.new_page()
    await page.clock.install()  # the page's timers run when the test says, not after 5 s of waiting each
    await page.goto(stack.url + "/sign-in")
    await page.fill("#key", stack.keys["operator"].key)
    await page.click("#sign-in")
    await page.wait_for_url(stack.url + "/")
    await page.goto(stack.url + "/queues")
    for tick in range(3):
        await page.evaluate("document.getElementById('queues').setAttribute('data-seen', '')")
        await page.clock.run_for(5000)
        await page.wait_for_function("() => !document.getElementById('queues').hasAttribute('data-seen')")
        assert await page.locator("#row-merchant-events").count() == 1, f"tick {tick}"


@dataclass
class ForgedPage:
    url: str
    runner: web.AppRunner

    async def close(self) -> None:
        await self.runner.cleanup()


async def forged_form_page(target: str) -> ForgedPage:
    """Another site's page that posts a revocation to the console on load, without the session's CSRF token."""
    html = (f'<!doctype html><form id="f" method="post" action="{target}"><input name="reason" value="forged">'
            '</form><script>document.getElementById("f").submit()</script>')

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return ForgedPage(f"http://127.0.0.1:{runner.addresses[0][1]}/", runner)
