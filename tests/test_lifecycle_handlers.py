"""The token-refresh and revocations handlers as plain async functions, for both providers: on the in-memory
store and the sandbox Alipay gateway (which checks our signatures and signs its answers), without a broker.

The same handlers through the real runtime, broker and databases: tests/test_lifecycle_workers.py.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from authnotify.alipay.client import AlipayClient
from authnotify.config import ProviderConfig
from authnotify.devtools.sandbox.alipay_gateway import Outcome, RunningAlipayGateway
from authnotify.domain.authorizations import Cancellation, TokenGrant, access_token_fingerprint
from authnotify.domain.commands import RefreshRequest, RevokeCommand
from authnotify.errors import PermanentError, TransientError
from authnotify.messaging.topology import Consumer
from authnotify.store.memory import InMemoryStore
from authnotify.workers.revocations import handle_revoke_command
from authnotify.workers.token_refresh import handle_refresh_request
from tests.fakes import context_for

PROVIDERS = ("ams", "aps")
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def providers(keys: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ProviderConfig]:
    """Both providers' configuration, made once: loading a private key costs tens of milliseconds."""
    from tests.conftest import _test_settings

    return _test_settings(keys, tmp_path_factory.mktemp("settings")).providers()


@pytest.fixture
async def clients(providers: dict[str, ProviderConfig], gateway: RunningAlipayGateway) -> AsyncIterator[Any]:
    async with aiohttp.ClientSession() as session:
        yield {name: AlipayClient(dataclasses.replace(config, gateway_url=gateway.url), session, timeout=1.0)
               for name, config in providers.items()}


async def activate(store: InMemoryStore, provider: str, **fields: Any) -> tuple[str, str, str]:
    """An active authorization; returns (authorizationId, access token, refresh token)."""
    access, refresh = f"AT{uuid.uuid4().hex}", f"RT{uuid.uuid4().hex}"
    values: dict[str, Any] = {"provider": provider, "access_token": access, "refresh_token": refresh,
                              "access_token_expiry_time": NOW + timedelta(hours=2),
                              "refresh_token_expiry_time": NOW + timedelta(days=100),
                              "auth_client_id": "218823863726123456789", "reference_merchant_id": "M-1"}
    values.update(fields)
    transition = await store.record_tokens(TokenGrant(**values))
    assert transition.authorization.authorizationId is not None
    return transition.authorization.authorizationId, access, values["refresh_token"] or ""


async def refresh(store: InMemoryStore, clients: Any, authorization_id: str, provider: str, access: str,
                  **context: Any) -> list[Any]:
    request = RefreshRequest(authorizationId=authorization_id, provider=provider,  # type: ignore[arg-type]
                             accessTokenFingerprint=access_token_fingerprint(access))
    return await handle_refresh_request(request, context_for(Consumer.TOKEN_REFRESH, provider=provider, **context),
                                        store=store, alipay_clients=clients)


async def revoke(store: InMemoryStore, clients: Any, command: RevokeCommand, **context: Any) -> list[Any]:
    return await handle_revoke_command(command, context_for(Consumer.REVOCATIONS, provider=command.provider,
                                                            **context),
                                       store=store, alipay_clients=clients, max_attempts=3)


# --- token-refresh ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_refresh_stores_the_new_tokens_and_emits_refreshed_once(
        provider: str, clients: Any, gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    authorization_id, access, refresh_token = await activate(store, provider)

    [event] = await refresh(store, clients, authorization_id, provider, access)
    assert await refresh(store, clients, authorization_id, provider, access) == []  # a duplicate request
    [again] = await refresh(store, clients, authorization_id, provider, access, redelivered=True)

    new_access, new_refresh = gateway.gateway.refreshed_tokens_for(provider, refresh_token)
    assert gateway.gateway.refresh_calls[refresh_token] == 1
    [call] = gateway.gateway.requests
    assert call.grant_type == "REFRESH_TOKEN"
    assert (call.body.get("customerBelongsTo") == "ALIPAY_CN") if provider == "ams" else (
        call.body["authClientId"] == "218823863726123456789" and call.body["referenceMerchantId"] == "M-1")
    assert event.type == "authorization.refreshed" and again.to_json() == event.to_json()
    assert event.data.accessTokenFingerprint == access_token_fingerprint(new_access)
    assert event.data.authorizationId == authorization_id
    current = await store.current_tokens(authorization_id)
    assert current is not None and (current.access_token, current.refresh_token) == (new_access, new_refresh)
    found = await store.get_authorization(access_token_fingerprint(access))  # the old fingerprint still names it
    assert found is not None and found.authorizationId == authorization_id
    assert access not in event.to_json().decode() and new_access not in event.to_json().decode()


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_refresh_answered_f_expires_it_once_whatever_the_redeliveries(
        provider: str, clients: Any, gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    authorization_id, access, _ = await activate(store, provider)
    gateway.gateway.script(Outcome.failure("INVALID_REFRESH_TOKEN"), operation="refresh")

    [event] = await refresh(store, clients, authorization_id, provider, access)
    assert await refresh(store, clients, authorization_id, provider, access) == []
    [again] = await refresh(store, clients, authorization_id, provider, access, redelivered=True, attempt=2)

    assert event.type == "authorization.expired" and again.id == event.id and again.to_json() == event.to_json()
    assert event.data.status == "expired" and "INVALID_REFRESH_TOKEN" in (event.data.reason or "")
    assert len(gateway.gateway.requests) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_u_then_s_retries_then_refreshes(provider: str, clients: Any, gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    authorization_id, access, _ = await activate(store, provider)
    gateway.gateway.script(Outcome.unknown(), operation="refresh", times=1)
    gateway.gateway.script(Outcome.http_error(503), operation="refresh", times=1)

    for _ in range(2):
        with pytest.raises(TransientError):
            await refresh(store, clients, authorization_id, provider, access)
    [event] = await refresh(store, clients, authorization_id, provider, access, attempt=3)
    assert event.type == "authorization.refreshed"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_refresh_token_already_expired_expires_it_without_calling_alipay(
        provider: str, clients: Any, gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    authorization_id, access, _ = await activate(store, provider,
                                                 refresh_token_expiry_time=NOW - timedelta(minutes=1))
    [event] = await refresh(store, clients, authorization_id, provider, access)
    assert event.type == "authorization.expired" and event.data.reason == "the refresh token expired"
    assert gateway.gateway.requests == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_no_refresh_token_expires_it_when_the_access_token_does_and_not_before(
        provider: str, clients: Any, gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    valid_id, valid, _ = await activate(store, provider, refresh_token=None)
    dead_id, dead, _ = await activate(store, provider, refresh_token=None,
                                      access_token_expiry_time=NOW - timedelta(seconds=1))
    assert await refresh(store, clients, valid_id, provider, valid) == []
    [event] = await refresh(store, clients, dead_id, provider, dead)
    assert event.type == "authorization.expired" and "no refresh token" in (event.data.reason or "")
    assert (await store.get_authorization(valid_id)).status == "active"  # type: ignore[union-attr]
    assert gateway.gateway.requests == []


async def test_an_f_refusing_our_request_is_dead_lettered_not_an_expiry(clients: Any,
                                                                        gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    authorization_id, access, _ = await activate(store, "aps")
    gateway.gateway.script(Outcome.failure("INVALID_SIGNATURE"), operation="refresh")
    with pytest.raises(PermanentError, match="INVALID_SIGNATURE"):
        await refresh(store, clients, authorization_id, "aps", access)
    assert (await store.get_authorization(authorization_id)).status == "active"  # type: ignore[union-attr]


async def test_a_request_for_a_canceled_authorization_does_nothing(clients: Any, gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    authorization_id, access, _ = await activate(store, "aps")
    await store.record_cancellation(Cancellation(provider="aps", access_token=access))
    assert await refresh(store, clients, authorization_id, "aps", access) == []
    assert await refresh(store, clients, authorization_id, "aps", access, redelivered=True) == []
    with pytest.raises(PermanentError, match="no authorization"):
        await refresh(store, clients, "auth_unknown", "aps", access)
    assert gateway.gateway.requests == []


# --- revocations -----------------------------------------------------------------------------------------

SOURCE = {"ams": "MERCHANT", "aps": "ACQUIRER"}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_revoke_s_cancels_with_our_source_and_reason(provider: str, clients: Any,
                                                           gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    authorization_id, access, _ = await activate(store, provider)
    command = RevokeCommand(authorizationId=authorization_id, provider=provider, reason="merchant ended it")  # type: ignore[arg-type]

    [event] = await revoke(store, clients, command)
    [again] = await revoke(store, clients, command, redelivered=True)
    assert await revoke(store, clients, command) == []  # revoking a canceled one: a successful no-op

    assert event.type == "authorization.canceled" and again.to_json() == event.to_json()
    assert event.data.tokenCancelSource == SOURCE[provider] and event.data.reason == "merchant ended it"
    [call] = gateway.gateway.requests
    assert call.path.endswith("/revoke" if provider == "ams" else "/cancelToken")
    assert call.path.startswith("/ams/sandbox/") if provider == "ams" else call.path.startswith("/aps/api/")
    assert call.body == ({"accessToken": access} if provider == "ams"
                         else {"accessToken": access, "authClientId": "218823863726123456789"})
    outcome = await store.command(command.commandId)
    assert outcome is not None and outcome.status == "succeeded"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_revoke_u_then_s_retries_with_the_same_token(provider: str, clients: Any,
                                                           gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    authorization_id, access, _ = await activate(store, provider)
    command = RevokeCommand(authorizationId=authorization_id, provider=provider)  # type: ignore[arg-type]
    gateway.gateway.script(Outcome.unknown(), operation="revoke", times=1)
    with pytest.raises(TransientError, match="answered U"):
        await revoke(store, clients, command)
    assert (await store.command(command.commandId)).status == "retrying"  # type: ignore[union-attr]
    [event] = await revoke(store, clients, command, attempt=2)
    assert event.type == "authorization.canceled"
    assert gateway.gateway.revoke_calls[access] == 2


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_revoke_f_already_invalid_cancels_and_other_f_fails(provider: str, clients: Any,
                                                                  gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    invalid_id, _, _ = await activate(store, provider)
    refused_id, _, _ = await activate(store, provider)
    gateway.gateway.script(Outcome.failure("INVALID_ACCESS_TOKEN"), operation="revoke", times=1)
    [event] = await revoke(store, clients, RevokeCommand(authorizationId=invalid_id, provider=provider))  # type: ignore[arg-type]
    assert event.type == "authorization.canceled"

    gateway.gateway.script(Outcome.failure("PROCESS_FAIL"), operation="revoke", times=1)
    failing = RevokeCommand(authorizationId=refused_id, provider=provider)  # type: ignore[arg-type]
    with pytest.raises(PermanentError, match="answered F PROCESS_FAIL"):
        await revoke(store, clients, failing)
    outcome = await store.command(failing.commandId)
    assert outcome is not None and outcome.status == "failed" and "PROCESS_FAIL" in (outcome.detail or "")
    assert (await store.get_authorization(refused_id)).status == "active"  # type: ignore[union-attr]


async def test_revoking_an_expired_authorization_is_a_no_op(clients: Any, gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    authorization_id, _, _ = await activate(store, "ams")
    await store.record_expiry(authorization_id, "test")
    command = RevokeCommand(authorizationId=authorization_id, provider="ams")
    assert await revoke(store, clients, command, redelivered=True) == []
    assert (await store.command(command.commandId)).detail == "no op"  # type: ignore[union-attr]
    assert gateway.gateway.requests == []


async def test_the_last_transient_failure_records_the_command_failed(clients: Any,
                                                                     gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    authorization_id, _, _ = await activate(store, "aps")
    gateway.gateway.script(Outcome.http_error(500), operation="revoke")
    command = RevokeCommand(authorizationId=authorization_id, provider="aps")
    with pytest.raises(TransientError):
        await revoke(store, clients, command, attempt=3)
    assert (await store.command(command.commandId)).status == "failed"  # type: ignore[union-attr]
