"""The notification handlers as plain async functions: a validated model in, the events to emit out.

They run here on the in-memory store and the sandbox Alipay gateway, without a broker, in milliseconds.
The same handlers through the real runtime, on SQLite and PostgreSQL: tests/test_token_created.py,
tests/test_token_canceled.py and tests/test_authcode_created.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from authnotify.alipay.client import AlipayClient
from authnotify.config import Settings
from authnotify.devtools.sandbox.alipay_gateway import Outcome, RunningAlipayGateway
from authnotify.domain.authorizations import access_token_fingerprint
from authnotify.errors import PermanentError, TransientError
from authnotify.messaging.topology import Consumer
from authnotify.store.memory import InMemoryStore
from authnotify.workers.authcode_created import handle_authcode_created, parse_authcode_created
from authnotify.workers.token_canceled import handle_token_canceled, parse_token_canceled
from authnotify.workers.token_created import handle_token_created, parse_token_created
from tests.events_harness import aps_token_canceled, aps_token_created
from tests.fakes import context_for


def token() -> str:
    return f"AT{uuid.uuid4().hex}"


async def created(store: InMemoryStore, body: dict[str, Any], **context: Any) -> list[Any]:
    ctx = context_for(Consumer.TOKEN_CREATED, **context)
    return await handle_token_created(parse_token_created(orjson.dumps(body), ctx), ctx, store=store)


async def canceled(store: InMemoryStore, body: dict[str, Any], **context: Any) -> list[Any]:
    ctx = context_for(Consumer.TOKEN_CANCELED, **context)
    return await handle_token_canceled(parse_token_canceled(orjson.dumps(body), ctx), ctx, store=store)


async def test_token_created_emits_one_activation_and_a_redelivery_repeats_it_byte_for_byte() -> None:
    store = InMemoryStore()
    access = token()
    [event] = await created(store, aps_token_created(access))
    assert await created(store, aps_token_created(access)) == []  # Alipay's fresh duplicate: nothing
    [again] = await created(store, aps_token_created(access), redelivered=True)  # may have died unpublished

    assert event.type == "authorization.activated" and event.to_json() == again.to_json()
    assert event.data.accessTokenFingerprint == access_token_fingerprint(access)
    assert event.data.status == "active" and event.data.referenceAgreementId == f"agr-{access[-12:]}"
    assert await store.tokens_of("aps", access_token_fingerprint(access)) == (access, f"refresh-{access}")


async def test_a_cancellation_before_its_creation_leaves_it_canceled_and_never_activated() -> None:
    store = InMemoryStore()
    access = token()
    [event] = await canceled(store, aps_token_canceled(access))
    assert event.type == "authorization.canceled" and event.data.tokenCancelSource == "PSP"

    assert await created(store, aps_token_created(access)) == []
    assert await created(store, aps_token_created(access), redelivered=True) == []
    stored = await store.get_authorization(access_token_fingerprint(access))
    assert stored is not None and stored.status == "canceled"
    assert stored.referenceAgreementId == f"agr-{access[-12:]}"  # filled in by the late creation


async def test_a_cancellation_carries_what_the_creation_knew() -> None:
    store = InMemoryStore()
    access = token()
    await created(store, aps_token_created(access))
    [event] = await canceled(store, aps_token_canceled(access, reason="moved to another wallet"))
    data = event.data
    assert (data.status, data.reason, data.customerId) == ("canceled", "moved to another wallet",
                                                         "278980891234567891234567891")
    assert await canceled(store, aps_token_canceled(access)) == []
    assert [e.id for e in await canceled(store, aps_token_canceled(access), attempt=2)] == [event.id]


async def test_a_database_outage_is_transient() -> None:
    store = InMemoryStore()
    store.failure = "database unreachable"
    with pytest.raises(TransientError):
        await created(store, aps_token_created(token()))


# --- authcode-created, against the sandbox gateway ------------------------------------------------


@pytest.fixture
async def clients(offline_settings: Callable[..., Settings], gateway: RunningAlipayGateway) -> Any:
    settings = offline_settings(ams_gateway_url=gateway.url, aps_gateway_url=gateway.url)
    async with aiohttp.ClientSession() as session:
        yield {name: AlipayClient(config, session, timeout=1.0) for name, config in settings.providers().items()}


def authcode_body(code: str) -> dict[str, Any]:
    return {"authorizationNotifyType": "AUTHCODE_CREATED", "authClientId": "218823863726123456789",
            "referenceMerchantId": "218823863726123456780", "authCode": code, "authState": "state",
            "referenceAgreementId": f"agr-{code[-8:]}", "acquirerId": "1021234567891230001",
            "pspId": "1021234567891230002"}


async def exchange(store: InMemoryStore, clients: Any, code: str, **context: Any) -> list[Any]:
    ctx = context_for(Consumer.AUTHCODE_CREATED, **context)
    notification = parse_authcode_created(orjson.dumps(authcode_body(code)), ctx)
    return await handle_authcode_created(notification, ctx, store=store, alipay_clients=clients)


async def test_an_auth_code_is_exchanged_once_whatever_the_copies(clients: Any, gateway: RunningAlipayGateway) -> None:
    store = InMemoryStore()
    code = f"CODE{uuid.uuid4().hex}"
    [event] = await exchange(store, clients, code)
    assert await exchange(store, clients, code) == []
    [again] = await exchange(store, clients, code, redelivered=True)

    assert gateway.gateway.calls[code] == 1
    access, refresh = gateway.gateway.tokens_for("aps", code)
    assert event.id == again.id and event.data.accessTokenFingerprint == access_token_fingerprint(access)
    assert await store.tokens_of("aps", access_token_fingerprint(access)) == (access, refresh)


@pytest.mark.parametrize(("outcome", "error"), [
    (Outcome.failure("INVALID_CODE"), PermanentError), (Outcome.unknown(), TransientError),
    (Outcome.http_error(502), TransientError), (Outcome.bad_signature(), TransientError),
])
async def test_apply_token_answers_become_permanent_or_transient_failures(
    clients: Any, gateway: RunningAlipayGateway, outcome: Outcome, error: type[Exception],
) -> None:
    store = InMemoryStore()
    code = f"CODE{uuid.uuid4().hex}"
    gateway.gateway.script(outcome, auth_code=code)
    with pytest.raises(error) as raised:
        await exchange(store, clients, code)
    assert code not in str(raised.value)
    assert await store.list_authorizations() == []
