"""The internal API: every route, its keys and scopes, its problems, pagination, the audited access token
(refreshed on demand by the token-refresh handler against the sandbox gateway), and the OpenAPI document
checked against the routes the application really has.

These run on the in-memory store and publisher (the same interfaces as the real ones); the API process on
the real broker and PostgreSQL is measured by ``make bench-lifecycle`` and run by ``authnotify dev``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from authnotify.alipay.client import AlipayClient
from authnotify.api.app import create_api_app
from authnotify.api.console import CONSOLE_PATHS
from authnotify.api.keys import ApiKeys, new_api_key, parse_api_keys
from authnotify.api.openapi import openapi_document
from authnotify.devtools.sandbox.alipay_gateway import RunningAlipayGateway
from authnotify.domain.authorizations import TokenGrant, access_token_fingerprint
from authnotify.domain.commands import RefreshRequest, RevokeCommand
from authnotify.messaging.memory import InMemoryPublisher
from authnotify.messaging.topology import Consumer, QueueType, Topology, command_routing_key
from authnotify.store.memory import InMemoryStore
from authnotify.workers.token_refresh import handle_refresh_request
from tests.fakes import context_for

NOW = datetime.now(UTC).replace(microsecond=0)
ALL_SCOPES = ["authorizations:read", "tokens:read", "authorizations:revoke", "dlq:read", "dlq:write"]


class Keys:
    def __init__(self) -> None:
        self.made = {name: new_api_key(name, scopes) for name, scopes in {
            "all": ALL_SCOPES, "reader": ["authorizations:read"], "tokens": ["tokens:read"],
            "revoker": ["authorizations:revoke"], "dlq-reader": ["dlq:read"], "dlq-writer": ["dlq:write"]}.items()}
        self.file: ApiKeys = parse_api_keys("".join(made.toml_entry() for made in self.made.values()))

    def header(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.made[name].key}"}


@pytest.fixture
def api_keys() -> Keys:
    return Keys()


@pytest.fixture
async def api(api_keys: Keys) -> AsyncIterator[Any]:
    store, publisher = InMemoryStore(), InMemoryPublisher()
    topology = Topology(f"t{uuid.uuid4().hex[:8]}", QueueType.CLASSIC, (1.0, 2.0))
    # No access log, as `authnotify api` serves it: a path can hold what a caller pasted by mistake.
    server = TestServer(create_api_app(store, publisher, topology, api_keys.file))
    await server.start_server(access_log=None)
    client = TestClient(server)
    await client.start_server()
    client.store, client.publisher, client.topology = store, publisher, topology  # type: ignore[attr-defined]
    yield client
    await client.close()


async def activate(store: InMemoryStore, provider: str = "aps", **fields: Any) -> tuple[str, str]:
    access = f"AT{uuid.uuid4().hex}"
    values: dict[str, Any] = {"provider": provider, "access_token": access, "refresh_token": f"RT{uuid.uuid4().hex}",
                              "access_token_expiry_time": NOW + timedelta(days=20),
                              "refresh_token_expiry_time": NOW + timedelta(days=100),
                              "auth_client_id": "218823863726123456789", "reference_merchant_id": "M-1",
                              "reference_agreement_id": f"agr-{access[-8:]}"}
    values.update(fields)
    transition = await store.record_tokens(TokenGrant(**values))
    return transition.authorization.authorizationId or "", access


async def problem(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == status and body["type"].startswith("urn:authnotify:problem:") and body["title"]
    return body


# --- keys and scopes ----------------------------------------------------------------------------------------

ROUTES_UNDER_TEST = [
    ("GET", "/v1/authorizations", "reader"),
    ("GET", "/v1/authorizations/{id}", "reader"),
    ("POST", "/v1/authorizations/{id}/access-token", "tokens"),
    ("POST", "/v1/authorizations/{id}/revoke", "revoker"),
    ("GET", "/v1/commands/cmd_x", "reader"),
    ("GET", "/v1/dlq", "dlq-reader"),
    ("POST", "/v1/dlq/replay", "dlq-writer"),
    ("GET", "/v1/queues", "dlq-reader"),
]


@pytest.mark.parametrize(("method", "path", "allowed"), ROUTES_UNDER_TEST)
async def test_every_route_wants_a_known_key_with_its_scope(api: Any, api_keys: Keys, method: str, path: str,
                                                            allowed: str) -> None:
    authorization_id, _ = await activate(api.store)
    path = path.format(id=authorization_id)
    await problem(await api.request(method, path), 401)
    await problem(await api.request(method, path, headers={"Authorization": "Bearer ank_not-a-key"}), 401)
    await problem(await api.request(method, path, headers={"Authorization": "Basic abc"}), 401)
    for name in ("reader", "tokens", "revoker", "dlq-reader", "dlq-writer"):
        response = await api.request(method, path, headers=api_keys.header(name))
        if name == allowed:
            assert response.status != 403 and response.status != 401
        else:
            assert "lacks the scope" in (await problem(response, 403))["detail"]


async def test_unknown_routes_and_methods_are_problems(api: Any, api_keys: Keys) -> None:
    await problem(await api.get("/v1/nothing", headers=api_keys.header("all")), 404)
    await problem(await api.delete("/v1/authorizations", headers=api_keys.header("all")), 405)


# --- reading ----------------------------------------------------------------------------------------------


async def test_list_pages_with_an_opaque_cursor_and_filters(api: Any, api_keys: Keys) -> None:
    made = [await activate(api.store) for _ in range(5)]
    await activate(api.store, provider="ams", refresh_token_expiry_time=NOW + timedelta(hours=3))
    seen: list[str] = []
    cursor = None
    while True:
        response = await api.get("/v1/authorizations", params={"provider": "aps", "limit": "2",
                                                                **({"cursor": cursor} if cursor else {})},
                                 headers=api_keys.header("reader"))
        assert response.status == 200
        page = await response.json()
        seen += [item["authorizationId"] for item in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == [authorization_id for authorization_id, _ in made]
    soon = await (await api.get("/v1/authorizations", params={"expiringWithin": "1d"},
                                headers=api_keys.header("reader"))).json()
    assert [item["provider"] for item in soon["items"]] == ["ams"]
    for params in ({"status": "gone"}, {"limit": "0"}, {"limit": "x"}, {"cursor": "!!"}, {"expiringWithin": "soon"},
                   {"provider": "x"}, {"unknown": "1"}):
        await problem(await api.get("/v1/authorizations", params=params, headers=api_keys.header("reader")), 400)


async def test_one_authorization_by_any_key_with_its_history(api: Any, api_keys: Keys) -> None:
    authorization_id, access = await activate(api.store)
    found = await api.store.get_authorization(authorization_id)
    for key in (authorization_id, access_token_fingerprint(access), found.referenceAgreementId):
        response = await api.get(f"/v1/authorizations/{key}", headers=api_keys.header("reader"))
        assert response.status == 200
        body = await response.json()
        assert body["authorizationId"] == authorization_id
        assert [entry["type"] for entry in body["history"]] == ["authorization.activated"]
        assert access not in await response.text()
    await problem(await api.get("/v1/authorizations/auth_missing", headers=api_keys.header("reader")), 404)


# --- the access token -------------------------------------------------------------------------------------


async def test_access_token_is_the_only_answer_with_a_token_and_is_audited_without_it(
        api: Any, api_keys: Keys, json_logs: None, capsys: pytest.CaptureFixture[str]) -> None:
    authorization_id, access = await activate(api.store)
    response = await api.post(f"/v1/authorizations/{access_token_fingerprint(access)}/access-token",
                              headers=api_keys.header("tokens"))
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    assert await response.json() == {"authorizationId": authorization_id, "accessToken": access,
                                     "accessTokenExpiryTime": (NOW + timedelta(days=20)).isoformat().replace(
                                         "+00:00", "Z")}
    await problem(await api.post("/v1/authorizations/nope/access-token", headers=api_keys.header("tokens")), 404)
    # The raw token pasted where its name belongs: not found, and repeated nowhere (only as its fingerprint).
    pasted = await problem(await api.post(f"/v1/authorizations/{access}/access-token",
                                          headers=api_keys.header("tokens")), 404)
    assert access not in str(pasted) and access_token_fingerprint(access) in str(pasted)
    logs = capsys.readouterr().err
    audit = [orjson.loads(line) for line in logs.splitlines() if '"access_token_requested"' in line]
    assert [(a["key_name"], a["authorization_id"], a["outcome"]) for a in audit] == [
        ("tokens", authorization_id, "issued"), ("tokens", None, "not_found"), ("tokens", None, "not_found")]
    assert audit[-1]["key_asked"] == f"sha256:{access_token_fingerprint(access)}"
    assert access not in logs and api_keys.made["tokens"].key not in logs


async def test_access_token_of_an_ended_authorization_is_409(api: Any, api_keys: Keys) -> None:
    authorization_id, _ = await activate(api.store)
    await api.store.record_expiry(authorization_id, "test")
    body = await problem(await api.post(f"/v1/authorizations/{authorization_id}/access-token",
                                        headers=api_keys.header("tokens")), 409)
    assert "expired" in body["detail"]


@pytest.fixture
async def clients(keys: Any, tmp_path: Any, gateway: RunningAlipayGateway) -> AsyncIterator[Any]:
    from tests.conftest import _test_settings

    settings = _test_settings(keys, tmp_path, ams_gateway_url=gateway.url, aps_gateway_url=gateway.url)
    async with aiohttp.ClientSession() as session:
        yield {name: AlipayClient(config, session, timeout=1.0) for name, config in settings.providers().items()}


@contextlib.asynccontextmanager
async def refresh_worker(store: InMemoryStore, publisher: InMemoryPublisher, topology: Topology,
                         clients: Any) -> AsyncIterator[None]:
    """The token-refresh handler, fed what the API publishes to its queue."""
    async def work() -> None:
        handled = 0
        while True:
            requests = publisher.to(command_routing_key(Consumer.TOKEN_REFRESH))
            for message in requests[handled:]:
                request = RefreshRequest.model_validate_json(message.body)
                await handle_refresh_request(request, context_for(Consumer.TOKEN_REFRESH), store=store,
                                             alipay_clients=clients)
            handled = len(requests)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(work())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_access_token_expiring_within_60_s_is_refreshed_first(api: Any, api_keys: Keys, clients: Any,
                                                                       gateway: RunningAlipayGateway) -> None:
    authorization_id, access = await activate(api.store, access_token_expiry_time=datetime.now(UTC) + timedelta(
        seconds=30))
    async with refresh_worker(api.store, api.publisher, api.topology, clients):
        response = await api.post(f"/v1/authorizations/{authorization_id}/access-token", headers=api_keys.header("tokens"))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["accessToken"] != access and body["authorizationId"] == authorization_id
    assert gateway.gateway.refresh_calls and len(gateway.gateway.requests) == 1
    [request] = api.publisher.to(command_routing_key(Consumer.TOKEN_REFRESH))
    assert RefreshRequest.model_validate_json(request.body).origin == "on-demand"


# --- revocation ----------------------------------------------------------------------------------------------


async def test_revoke_queues_a_command_and_its_outcome_can_be_read(api: Any, api_keys: Keys) -> None:
    authorization_id, access = await activate(api.store)
    response = await api.post(f"/v1/authorizations/{access_token_fingerprint(access)}/revoke",
                              json={"reason": "closed"}, headers=api_keys.header("revoker"))
    assert response.status == 202
    command_id = (await response.json())["commandId"]
    assert response.headers["Location"] == f"/v1/commands/{command_id}"
    [queued] = api.publisher.to(command_routing_key(Consumer.REVOCATIONS))
    command = RevokeCommand.model_validate_json(queued.body)
    assert (command.commandId, command.authorizationId, command.reason) == (command_id, authorization_id, "closed")
    assert access not in queued.body.decode()

    await problem(await api.get(f"/v1/commands/{command_id}", headers=api_keys.header("reader")), 404)  # not yet
    from authnotify.store.repository import CommandOutcome

    await api.store.record_command(CommandOutcome(command_id, "revoke", authorization_id, "succeeded", "canceled", 1,
                                                  datetime.now(UTC)))
    status = await (await api.get(f"/v1/commands/{command_id}", headers=api_keys.header("reader"))).json()
    assert status["status"] == "succeeded" and status["authorizationId"] == authorization_id

    empty = await api.post(f"/v1/authorizations/{authorization_id}/revoke", headers=api_keys.header("revoker"))
    assert empty.status == 202  # the reason is optional
    for body in (b"{", b'{"reason": 5}', b'{"other": 1}', orjson.dumps({"reason": "x" * 300})):
        await problem(await api.post(f"/v1/authorizations/{authorization_id}/revoke", data=body,
                                     headers=api_keys.header("revoker")), 400)
    await problem(await api.post("/v1/authorizations/missing/revoke", headers=api_keys.header("revoker")), 404)


async def test_a_broker_that_refuses_is_503(api: Any, api_keys: Keys) -> None:
    authorization_id, _ = await activate(api.store)
    api.publisher.failure = "nacked by the broker"
    await problem(await api.post(f"/v1/authorizations/{authorization_id}/revoke", headers=api_keys.header("revoker")), 503)
    api.store.failure = "database down"
    await problem(await api.get("/v1/authorizations", headers=api_keys.header("reader")), 503)


# --- dead letters and queues (their real-broker behaviour: tests/test_api_dead_letters.py) -------------------


async def test_dead_letter_queries_and_replay_bodies_are_checked_before_the_broker_is_asked(api: Any,
                                                                                          api_keys: Keys) -> None:
    headers = api_keys.header("all")
    for params in ({"queue": "nope"}, {"since": "yesterday"}, {"limit": "0"}, {"limit": "1001"}, {"limit": "x"},
                   {"merchant": "m" * 129}, {"other": "1"}):
        body = await problem(await api.get("/v1/dlq", params=params, headers=headers), 400)
        assert body["type"].endswith("invalid-query") and next(iter(params)) in body["detail"], body
    for sent in (b"", b"{", b"[]", b'{"queue": "nope", "all": true}', b'{"queue": "merchant-events"}',
                 b'{"queue": "merchant-events", "ids": []}', b'{"queue": "merchant-events", "all": false}',
                 b'{"queue": "merchant-events", "ids": ["a"], "all": true}', b'{"queue": "merchant-events", "all": true, '
                 b'"since": "soon"}', b'{"queue": "merchant-events", "all": true, "extra": 1}'):
        body = await problem(await api.post("/v1/dlq/replay", data=sent, headers=headers), 400)
        assert body["type"].endswith("invalid-body"), sent
    # Well-formed, but this API was made without a broker connection: unavailable, not an error.
    await problem(await api.get("/v1/dlq", params={"queue": "merchant-events", "since": "2026-11-23"},
                                headers=headers), 503)
    await problem(await api.post("/v1/dlq/replay", json={"queue": "merchant-events", "ids": ["x"]}, headers=headers), 503)
    await problem(await api.get("/v1/queues", headers=headers), 503)


# --- the OpenAPI document ------------------------------------------------------------------------------------


async def test_the_openapi_document_is_valid_and_describes_exactly_the_routes_there_are(api: Any) -> None:
    response = await api.get("/v1/openapi.json")  # no key needed
    assert response.status == 200
    document = await response.json()
    assert document == orjson.loads(orjson.dumps(openapi_document()))
    assert document["openapi"].startswith("3.1")
    validate(document)

    served = {(route.method, route.resource.canonical) for route in api.server.app.router.routes()
              if route.method != "HEAD" and route.resource is not None}
    documented = {(method.upper(), path) for path, methods in document["paths"].items() for method in methods}
    assert CONSOLE_PATHS <= served  # the console's pages (HTML, not in the document), and nothing else beside
    assert served - CONSOLE_PATHS == documented
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            if path.startswith("/v1/") and path != "/v1/openapi.json":
                assert operation["security"] and operation["x-scope"], (method, path)
                assert {"401", "403"} <= set(operation["responses"]), (method, path)
