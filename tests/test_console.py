"""The operator console's rules, on the in-memory store and publisher (tests/test_console_browser.py drives it
in a real browser against the real broker and database): signing in, the session cookie, CSRF, scopes, what
the pages show (never a token), revoking through a confirmation, and what is logged (never the key or the
cookie)."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from authnotify.api.app import create_api_app
from authnotify.api.keys import new_api_key, parse_api_keys
from authnotify.domain.authorizations import TokenGrant, access_token_fingerprint
from authnotify.domain.commands import RevokeCommand
from authnotify.messaging.memory import InMemoryPublisher
from authnotify.messaging.topology import Consumer, QueueType, Topology, command_routing_key
from authnotify.store.memory import InMemoryStore

NOW = datetime.now(UTC).replace(microsecond=0)
SCOPES = {"operator": ["authorizations:read", "authorizations:revoke", "dlq:read", "dlq:write", "tokens:read"],
          "reader": ["authorizations:read"], "dlq": ["dlq:read"]}


class Console:
    """A test client of the console, with the keys made for it and the store and publisher behind it."""

    def __init__(self, client: TestClient, store: InMemoryStore, publisher: InMemoryPublisher) -> None:
        self.client = client
        self.store = store
        self.publisher = publisher
        self.keys = {name: new_api_key(name, scopes) for name, scopes in SCOPES.items()}

    async def page(self, path: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, str]:
        response = await self.client.get(path, **kwargs)
        return response, await response.text()

    async def csrf(self, path: str = "/sign-in") -> str:
        _, html = await self.page(path)
        match = re.search(r'name="csrf" value="([^"]+)"', html)
        assert match, html
        return match.group(1)

    async def sign_in(self, name: str = "operator") -> aiohttp.ClientResponse:
        token = await self.csrf()
        return await self.client.post("/sign-in", data={"csrf": token, "key": self.keys[name].key, "next": "/"},
                                      allow_redirects=False)


@pytest.fixture
async def console() -> AsyncIterator[Console]:
    store, publisher = InMemoryStore(), InMemoryPublisher()
    made = Console(None, store, publisher)  # type: ignore[arg-type]
    keys = parse_api_keys("".join(key.toml_entry() for key in made.keys.values()))
    topology = Topology(f"t{uuid.uuid4().hex[:8]}", QueueType.CLASSIC, (1.0,))
    client = TestClient(TestServer(create_api_app(store, publisher, topology, keys)))
    await client.start_server()
    made.client = client
    yield made
    await client.close()


async def activate(store: InMemoryStore, merchant: str = "M-1") -> tuple[str, str, str]:
    """An active authorization; returns its id, its access token and its refresh token (which no page may show)."""
    access, refresh = f"AT{uuid.uuid4().hex}", f"RT{uuid.uuid4().hex}"
    transition = await store.record_tokens(TokenGrant(
        provider="aps", access_token=access, refresh_token=refresh, access_token_expiry_time=NOW + timedelta(days=20),
        refresh_token_expiry_time=NOW + timedelta(days=100), auth_client_id="2188001", reference_merchant_id=merchant,
        reference_agreement_id=f"agr-{access[-8:]}"))
    return transition.authorization.authorizationId or "", access, refresh


def message(html: str) -> str:
    found = re.search(r'id="message">([^<]*)<', html)
    return found.group(1) if found else ""


# --- signing in and out ---------------------------------------------------------------------------------


async def test_every_page_wants_a_signed_in_key_and_a_wrong_key_is_refused(console: Console) -> None:
    for path in ("/", "/dead-letters", "/queues", "/authorizations/auth_x", "/authorizations/auth_x/revoke"):
        response = await console.client.get(path, allow_redirects=False)
        assert response.status == 303 and response.headers["Location"].startswith("/sign-in?next=")
    token = await console.csrf()
    refused = await console.client.post("/sign-in", data={"csrf": token, "key": "ank_not-a-key"}, allow_redirects=False)
    assert refused.status == 401 and "not a key of this API" in await refused.text()
    assert (await console.client.get("/", allow_redirects=False)).status == 303  # still signed out

    signed_in = await console.sign_in()
    assert signed_in.status == 303 and signed_in.headers["Location"] == "/"
    response, html = await console.page("/")
    assert response.status == 200 and 'id="key-name">operator<' in html


async def test_the_session_cookie_is_encrypted_http_only_strict_and_secure_over_https(console: Console) -> None:
    response = await console.sign_in()
    cookie = response.cookies["authnotify_console"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and not cookie["secure"]
    assert int(cookie["max-age"]) == 8 * 3600
    key = console.keys["operator"]
    assert key.key not in cookie.value and key.sha256 not in cookie.value and "operator" not in cookie.value

    console.client.session.cookie_jar.clear()
    behind_tls = await console.client.get("/sign-in", headers={"X-Forwarded-Proto": "https"})
    assert behind_tls.cookies["authnotify_console"]["secure"]


async def test_sign_in_goes_back_to_the_page_asked_for_but_never_to_another_site(console: Console) -> None:
    token = await console.csrf()
    for target, expected in (("/queues", "/queues"), ("//evil.example/x", "/"), ("https://evil.example", "/")):
        response = await console.client.post("/sign-in", data={"csrf": token, "key": console.keys["operator"].key,
                                                               "next": target}, allow_redirects=False)
        assert response.headers["Location"] == expected
        token = await console.csrf("/queues")


async def test_a_session_ends_eight_hours_after_signing_in(console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    await console.sign_in()
    assert (await console.client.get("/", allow_redirects=False)).status == 200
    later = time.time() + 8 * 3600 + 1
    monkeypatch.setattr(time, "time", lambda: later)
    assert (await console.client.get("/", allow_redirects=False)).status == 303


async def test_sign_out_ends_the_session(console: Console) -> None:
    await console.sign_in()
    token = await console.csrf("/")
    response = await console.client.post("/sign-out", data={"csrf": token}, allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/sign-in"
    assert (await console.client.get("/", allow_redirects=False)).status == 303


# --- CSRF and scopes -------------------------------------------------------------------------------------


async def test_a_post_without_the_sessions_csrf_token_changes_nothing(console: Console) -> None:
    authorization_id, _, _ = await activate(console.store)
    await console.sign_in()
    for data in ({}, {"csrf": "forged"}, {"csrf": ""}):
        response = await console.client.post(f"/authorizations/{authorization_id}/revoke", data=data)
        assert response.status == 403 and "CSRF" in message(await response.text())
    assert console.publisher.published == []
    # A sign-in form from another session is refused too (no logging in a victim as someone else).
    other = TestClient(TestServer(console.client.server.app))
    await other.start_server()
    try:
        foreign = await other.post("/sign-in", data={"csrf": "forged", "key": console.keys["operator"].key})
        assert foreign.status == 403
    finally:
        await other.close()


async def test_pages_and_actions_the_keys_scopes_do_not_allow_are_refused_with_the_scope(console: Console) -> None:
    authorization_id, _, _ = await activate(console.store)
    await console.sign_in("dlq")
    response, html = await console.page("/")
    assert response.status == 403 and "lacks the scope authorizations:read" in message(html)
    await console.client.post("/sign-out", data={"csrf": await console.csrf("/queues")})

    await console.sign_in("reader")
    response, html = await console.page(f"/authorizations/{authorization_id}")
    assert response.status == 200 and 'id="revoke"' not in html  # no revoke button without the scope
    response, html = await console.page(f"/authorizations/{authorization_id}/revoke")
    assert response.status == 403 and "authorizations:revoke" in message(html)
    token = await console.csrf("/")
    refused = await console.client.post(f"/authorizations/{authorization_id}/revoke", data={"csrf": token})
    assert refused.status == 403 and console.publisher.published == []
    response, html = await console.page("/dead-letters")
    assert response.status == 403 and "dlq:read" in message(html)


# --- what the pages show ----------------------------------------------------------------------------------


async def test_search_by_id_fingerprint_agreement_or_merchant_and_no_page_shows_a_token(console: Console) -> None:
    authorization_id, access, refresh = await activate(console.store, merchant="M-7")
    other_id, other_access, other_refresh = await activate(console.store, merchant="M-8")
    found = await console.store.get_authorization(authorization_id)
    await console.sign_in()  # with tokens:read among its scopes: the console still never shows one
    pages = []
    for query in (authorization_id, access_token_fingerprint(access), found.referenceAgreementId, "M-7"):
        response, html = await console.page("/", params={"q": query})
        assert response.status == 200
        assert f'href="/authorizations/{authorization_id}"' in html and other_id not in html, query
        pages.append(html)
    _, nothing = await console.page("/", params={"q": "no-such-thing"})
    assert 'id="no-results"' in nothing
    _, everything = await console.page("/")
    assert authorization_id in everything and other_id in everything
    _, detail = await console.page(f"/authorizations/{access_token_fingerprint(access)}")
    assert "authorization.activated" in detail and 'id="revoke"' in detail
    _, confirm = await console.page(f"/authorizations/{authorization_id}/revoke")
    for html in (*pages, nothing, everything, detail, confirm):
        for secret in (access, refresh, other_access, other_refresh):
            assert secret not in html


async def test_revoke_asks_for_confirmation_then_queues_the_command(console: Console) -> None:
    authorization_id, access, _ = await activate(console.store)
    await console.sign_in()
    response, confirm = await console.page(f"/authorizations/{authorization_id}/revoke")
    assert response.status == 200 and "Revoke this authorization?" in confirm
    assert console.publisher.published == []  # asking is not doing
    token = re.search(r'name="csrf" value="([^"]+)"', confirm).group(1)  # type: ignore[union-attr]
    done = await console.client.post(f"/authorizations/{authorization_id}/revoke",
                                     data={"csrf": token, "reason": "merchant closed the account"})
    html = await done.text()
    assert done.status == 200 and done.url.path == f"/authorizations/{authorization_id}"
    [queued] = console.publisher.to(command_routing_key(Consumer.REVOCATIONS))
    command = RevokeCommand.model_validate_json(queued.body)
    assert command.authorizationId == authorization_id and command.reason == "merchant closed the account"
    assert f"command {command.commandId}" in html
    missing = await console.client.post("/authorizations/auth_missing/revoke", data={"csrf": token})
    assert missing.status == 404


async def test_the_dead_letter_and_queue_pages_say_when_the_broker_is_away(console: Console) -> None:
    await console.sign_in()
    for path in ("/dead-letters", "/queues"):
        response, html = await console.page(path)
        assert response.status == 503 and "unavailable" in message(html)
    token = await console.csrf("/")
    response = await console.client.post("/dead-letters/replay", data={"csrf": token, "queue": "merchant-events",
                                                                      "all": "1"})
    assert response.status == 503
    response = await console.client.post("/dead-letters/replay", data={"csrf": token, "queue": "nope", "all": "1"})
    assert response.status == 400 and "not a consumer" in message(await response.text())
    response, html = await console.page("/dead-letters", params={"since": "yesterday"})
    assert response.status == 400 and "since" in message(html)


async def test_pages_carry_a_strict_content_security_policy_and_static_files_are_served(console: Console) -> None:
    response, html = await console.page("/sign-in")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY" and response.headers["Cache-Control"] == "no-store"
    assert "<script>" not in html and " style=" not in html  # nothing inline: the policy allows none
    for asset in re.findall(r'(?:href|src)="(/static/[^"]+)"', html):
        assert (await console.client.get(asset)).status == 200


async def test_no_log_line_carries_the_key_or_the_cookie(console: Console, json_logs: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    authorization_id, access, _ = await activate(console.store)
    token = await console.csrf()
    await console.client.post("/sign-in", data={"csrf": token, "key": "ank_wrong-key-typed"})
    response = await console.sign_in()
    cookie = response.cookies["authnotify_console"].value
    await console.page("/", params={"q": authorization_id})
    token = await console.csrf("/")
    await console.client.post(f"/authorizations/{authorization_id}/revoke", data={"csrf": token})
    await console.client.post(f"/authorizations/{authorization_id}/revoke", data={"csrf": "forged"})
    logs = capsys.readouterr().err
    assert '"console_signed_in"' in logs and '"console_sign_in_refused"' in logs and '"console_csrf_refused"' in logs
    key = console.keys["operator"]
    for secret in (key.key, key.sha256, cookie, "ank_wrong-key-typed", access, hashlib.sha256(b"x").hexdigest()):
        assert secret not in logs
