"""The ingress's checks and answers without a broker: an in-memory publisher stands in for RabbitMQ.

What only a broker shows (confirms, returns, nacks, reconnects, what lands in which queue) is proven in
tests/test_ingress.py; here the status table, the published message and the failure answers run in
milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from authnotify.config import Settings
from authnotify.messaging import headers as h
from authnotify.messaging.memory import InMemoryPublisher
from authnotify.messaging.topology import build_topology
from tests.conftest import TestKeys as Keys
from tests.ingress_harness import (
    PROVIDER_CASES,
    SUCCESS_BODY,
    ProviderCase,
    RunningIngress,
    answer_signature_verifies,
    ingress_on_memory,
    notification_headers,
    rejection_rows,
)

PROVIDERS = pytest.mark.parametrize("case", PROVIDER_CASES, ids=lambda case: case.name)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def post(http: aiohttp.ClientSession, ingress: RunningIngress, case: ProviderCase, body: Any,
               headers: dict[str, str], method: str = "POST") -> tuple[int, dict[str, Any], Any]:
    async with http.request(method, ingress.url + case.path, data=body, headers=headers) as response:
        raw = await response.read()
        return response.status, orjson.loads(raw)["result"], response.headers


def token_created(marker: str = "1") -> bytes:
    return orjson.dumps({"authorizationNotifyType": "TOKEN_CREATED", "accessToken": f"tok-{marker}"})


@PROVIDERS
async def test_an_accepted_notification_is_published_as_received_then_answered_success(
    case: ProviderCase, offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys,
) -> None:
    settings = offline_settings()
    publisher = InMemoryPublisher()
    body = b'{ "authorizationNotifyType" : "TOKEN_CANCELED",\n "z": 1.50 }'
    async with ingress_on_memory(settings, publisher) as ingress:
        async with http.post(ingress.url + case.path, data=body,
                             headers=notification_headers(keys.alipay.private_key, case, body)) as response:
            answer = await response.read()
            assert (response.status, answer) == (200, SUCCESS_BODY)
            assert answer_signature_verifies(keys.ours.private_key.public_key(), case.path, response.headers, answer)

    [published] = publisher.published
    assert published.exchange == build_topology(settings).notifications_exchange
    assert published.routing_key == f"{case.name}.TOKEN_CANCELED"
    message = published.message
    assert message.body == body and message.properties.delivery_mode == 2
    assert message.properties.content_type == "application/json" and len(message.message_id or "") == 32
    headers = message.headers
    assert (headers[h.PROVIDER], headers[h.NOTIFY_TYPE], headers[h.ATTEMPT]) == (case.name, "TOKEN_CANCELED", 1)


@PROVIDERS
async def test_every_rejection_answers_its_row_and_publishes_nothing(
    case: ProviderCase, offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys,
) -> None:
    publisher = InMemoryPublisher()
    async with ingress_on_memory(offline_settings(), publisher) as ingress:
        for name, method, data, headers, status, code in rejection_rows(case, keys, token_created()):
            got = await post(http, ingress, case, data, headers, method)
            assert (got[0], got[1]["resultCode"], got[1]["resultStatus"]) == (status, code, "F"), name
    assert publisher.published == []


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b'{"authorizationNotifyType": "SOMETHING_NEW"}',
                                  b'{"authorizationNotifyType": 7}', b"{}"])
async def test_a_signed_body_of_no_known_type_is_kept_as_unknown_never_refused(
    offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys, body: bytes,
) -> None:
    publisher = InMemoryPublisher()
    case = PROVIDER_CASES[1]
    async with ingress_on_memory(offline_settings(), publisher) as ingress:
        status, result, _ = await post(http, ingress, case, body, notification_headers(keys.alipay.private_key, case, body))
    assert (status, result["resultStatus"]) == (200, "S")
    assert [(p.routing_key, p.message.body) for p in publisher.published] == [(f"{case.name}.unknown", body)]


@pytest.mark.parametrize("publisher", [InMemoryPublisher(ready=False), InMemoryPublisher(failure="nacked by the broker")],
                         ids=["broker down", "nacked"])
async def test_a_publish_that_is_not_confirmed_answers_503_u(
    offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys, publisher: InMemoryPublisher,
) -> None:
    case = PROVIDER_CASES[0]
    body = token_created()
    async with ingress_on_memory(offline_settings(), publisher) as ingress:
        status, result, headers = await post(http, ingress, case, body,
                                             notification_headers(keys.alipay.private_key, case, body))
        async with http.get(ingress.url + "/readyz") as ready:
            readiness = ready.status
    assert (status, result["resultCode"], result["resultStatus"]) == (503, "UNKNOWN_EXCEPTION", "U")
    assert headers["Client-Id"] == case.client_id  # failures are signed too
    assert readiness == (503 if not publisher.ready else 200)


async def test_publishes_awaiting_confirms_beyond_the_limit_answer_429(
    offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys,
) -> None:
    publisher = InMemoryPublisher(delay_seconds=0.5)  # confirms that take their time
    case = PROVIDER_CASES[0]
    bodies = [token_created(str(index)) for index in range(6)]
    async with ingress_on_memory(offline_settings(ingress_max_inflight=2), publisher) as ingress:
        answers = await asyncio.gather(*(
            post(http, ingress, case, body, notification_headers(keys.alipay.private_key, case, body))
            for body in bodies
        ))
        assert ingress.inflight.current == 0
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 200, 429, 429, 429, 429]
    assert all(result["resultCode"] == "REQUEST_TRAFFIC_EXCEED_LIMIT" for status, result, _ in answers if status == 429)
    assert len(publisher.published) == 2
