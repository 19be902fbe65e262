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
    epoch_ms_request_time,
    ingress_on_memory,
    iso_request_time,
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


# --- a hostile world: replays, slow clients (issues 2 and 3) ------------------------------------------

TOLERANCE = 26 * 3600  # AUTHNOTIFY_REQUEST_TIME_TOLERANCE's default: Alipay retries for 24 hours


def request_time(form: str, shift_seconds: float) -> str:
    return (iso_request_time(shift_seconds=shift_seconds, offset_hours=8) if form == "iso"
            else epoch_ms_request_time(shift_seconds))


@pytest.mark.parametrize("form", ["iso", "epoch-ms"])
async def test_request_time_is_accepted_just_inside_the_window_and_refused_just_outside(
    form: str, offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys,
) -> None:
    publisher = InMemoryPublisher()
    case = PROVIDER_CASES[1]
    edges = [(-TOLERANCE + 60, 200), (-TOLERANCE - 60, 401), (9 * 60, 200), (11 * 60, 401), (0, 200)]
    async with ingress_on_memory(offline_settings(), publisher) as ingress:
        for index, (shift, expected) in enumerate(edges):
            body = token_created(f"{form}-{index}")
            headers = notification_headers(keys.alipay.private_key, case, body,
                                           request_time=request_time(form, shift))
            status, result, _ = await post(http, ingress, case, body, headers)
            assert status == expected, (form, shift)
            if expected == 401:
                assert (result["resultCode"], result["resultStatus"]) == ("INVALID_SIGNATURE", "F")
    assert len(publisher.published) == 3  # the refused ones published nothing


@pytest.mark.parametrize("value", ["2001-01-01T00:00:00+00:00", "2099-01-01T00:00:00+00:00", "not-a-time",
                                   "978307200000", "4070908800000", "2026-13-45T99:00:00+08:00"])
async def test_a_replayed_or_unreadable_request_time_is_refused_and_publishes_nothing(
    value: str, offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys,
) -> None:
    """Issue 3: identical replays, and Request-Time values of 2001, 2099 and not-a-time, were all published."""
    publisher = InMemoryPublisher()
    case = PROVIDER_CASES[0]
    body = token_created()
    headers = notification_headers(keys.alipay.private_key, case, body, request_time=value)  # validly signed
    async with ingress_on_memory(offline_settings(), publisher) as ingress:
        status, result, _ = await post(http, ingress, case, body, headers)
    assert (status, result["resultCode"], result["resultStatus"]) == (401, "INVALID_SIGNATURE", "F")
    assert publisher.published == []


async def test_a_captured_request_replays_only_within_the_window(
    offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys,
) -> None:
    publisher = InMemoryPublisher()
    case = PROVIDER_CASES[0]
    body = token_created()
    captured = notification_headers(keys.alipay.private_key, case, body,
                                    request_time=iso_request_time(shift_seconds=-TOLERANCE - 3600))
    async with ingress_on_memory(offline_settings(), publisher) as ingress:
        answers = [await post(http, ingress, case, body, captured) for _ in range(3)]
    assert {status for status, _, _ in answers} == {401}
    assert publisher.published == []


async def _raw_request(url: str, case: ProviderCase, headers: dict[str, str], declared: int,
                       sent: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"POST {case.path} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {declared}\r\n\r\n".encode() + sent)
    await writer.drain()
    return reader, writer


@pytest.mark.slow  # waits on the body timeout and the lingering close
async def test_a_body_that_does_not_arrive_in_time_is_answered_408_u_and_the_connection_closed(
    offline_settings: Callable[..., Settings], keys: Keys,
) -> None:
    """Issue 2: nothing bounded the time to read a body."""
    publisher = InMemoryPublisher()
    case = PROVIDER_CASES[0]
    body = token_created()
    headers = notification_headers(keys.alipay.private_key, case, body)
    async with ingress_on_memory(offline_settings(ingress_body_timeout="300ms"), publisher) as ingress:
        reader, writer = await _raw_request(ingress.url, case, headers, len(body), body[:10])
        started = asyncio.get_running_loop().time()
        answer = await asyncio.wait_for(reader.read(), 5)  # read() to EOF: the ingress closes the connection
        elapsed = asyncio.get_running_loop().time() - started
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408")
    result = orjson.loads(rest.split(b"\r\n\r\n", 1)[1])["result"]
    assert (result["resultCode"], result["resultStatus"]) == ("UNKNOWN_EXCEPTION", "U")  # Alipay retries
    assert 0.25 < elapsed < 3
    assert publisher.published == []


@pytest.mark.slow  # waits for bodies to age past the eviction age, and on closed connections
async def test_slow_bodies_beyond_the_byte_budget_are_cut_off_and_a_valid_notification_still_succeeds(
    offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys,
) -> None:
    """Issue 2: 4,000 trickling bodies took the process past its memory limit. A budget of 256 KiB here stands
    in for the production 64 MiB; tests/bench/slowloris_bench.py measures the real thing."""
    from authnotify.ingress.checks import BodyBudget

    publisher = InMemoryPublisher()
    case = PROVIDER_CASES[0]
    budget = BodyBudget(256 * 1024, eviction_age=0.1)
    headers = notification_headers(keys.alipay.private_key, case, token_created())
    async with ingress_on_memory(offline_settings(), publisher, body_budget=budget) as ingress:
        slow = []
        peak = 0
        for _ in range(12):  # 12 x 60,000 bytes held would be 720 KB
            slow.append(await _raw_request(ingress.url, case, headers, 65000, b"x" * 60000))
            await asyncio.sleep(0.03)
            peak = max(peak, budget.held)
        await asyncio.sleep(0.2)
        body = token_created("valid")
        started = asyncio.get_running_loop().time()
        status, result, _ = await post(http, ingress, case, body, notification_headers(keys.alipay.private_key, case, body))
        answered_in = asyncio.get_running_loop().time() - started
        async def closed_by_the_ingress(reader: asyncio.StreamReader) -> bool:
            try:
                await asyncio.wait_for(reader.read(), 0.5)  # returns once the ingress has closed it
            except TimeoutError:
                return False
            return True

        cut = sum(await asyncio.gather(*(closed_by_the_ingress(reader) for reader, _ in slow)))
        for _, writer in slow:
            writer.close()
    assert peak <= budget.limit
    assert budget.evictions >= 8 and cut >= 8
    assert (status, result["resultCode"]) == (200, "SUCCESS") and answered_in < 5
    assert [p.message.body for p in publisher.published] == [body]


def test_idle_keep_alive_closes_after_75_seconds_and_the_open_file_limit_is_raised() -> None:
    import resource

    from aiohttp import web

    from authnotify.ingress.server import KEEPALIVE_TIMEOUT_SECONDS, ingress_runner, raise_open_file_limit

    assert KEEPALIVE_TIMEOUT_SECONDS == 75
    assert ingress_runner(web.Application())._kwargs["keepalive_timeout"] == 75
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
    try:
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- AUTHNOTIFY_NOTIFY_PATH_PREFIX: a proxy in front adds a prefix to the paths Alipay calls ----------------


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]


@PROVIDERS
async def test_with_a_path_prefix_both_paths_are_served_and_verified_and_answered_over_the_prefixed_one(
    case: ProviderCase, offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys,
) -> None:
    """Alipay calls and signs /alipay<notify path>; the proxy may pass it on as it is or strip the prefix."""
    prefixed = "/alipay" + case.path
    publisher = InMemoryPublisher()
    body = token_created("prefixed")
    async with ingress_on_memory(offline_settings(notify_path_prefix="/alipay"), publisher) as ingress:
        for reached in (case.path, prefixed):  # stripped by the proxy, passed through
            headers = notification_headers(keys.alipay.private_key, case, body, signed_path=prefixed)
            async with http.post(ingress.url + reached, data=body, headers=headers) as response:
                answer = await response.read()
                assert (response.status, answer) == (200, SUCCESS_BODY), reached
                assert answer_signature_verifies(keys.ours.private_key.public_key(), prefixed, response.headers, answer)
        # Signed over the plain path: not what Alipay calls when the prefix is right, so refused.
        plain = notification_headers(keys.alipay.private_key, case, body)
        async with http.post(ingress.url + case.path, data=body, headers=plain) as response:
            assert response.status == 401
    assert len(publisher.published) == 2


async def test_without_a_prefix_the_prefixed_path_does_not_exist(
    offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys,
) -> None:
    case = PROVIDER_CASES[0]
    body = token_created()
    async with ingress_on_memory(offline_settings(), InMemoryPublisher()) as ingress:
        headers = notification_headers(keys.alipay.private_key, case, body, signed_path="/alipay" + case.path)
        async with http.post(ingress.url + "/alipay" + case.path, data=body, headers=headers) as response:
            assert response.status == 404


async def test_consult_unbinding_follows_the_prefix_too(
    offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys,
) -> None:
    from authnotify.alipay.notifications import CONSULT_UNBINDING_PATH

    consult = ProviderCase("aps consultUnbinding", CONSULT_UNBINDING_PATH, PROVIDER_CASES[1].client_id, "0")
    body = orjson.dumps({"authClientId": "C-1", "referenceMerchantId": "M-1", "accessToken": "AT-consulted"})
    async with ingress_on_memory(offline_settings(notify_path_prefix="/edge/alipay"), InMemoryPublisher()) as ingress:
        for reached in (CONSULT_UNBINDING_PATH, "/edge/alipay" + CONSULT_UNBINDING_PATH):
            headers = notification_headers(keys.alipay.private_key, consult, body,
                                           signed_path="/edge/alipay" + CONSULT_UNBINDING_PATH)
            async with http.post(ingress.url + reached, data=body, headers=headers) as response:
                answer = orjson.loads(await response.read())
                assert (response.status, answer["allowUnbinding"]) == (200, "true"), reached


async def test_a_refused_signature_logs_the_key_version_path_and_client_id_tried_never_the_signature_or_body(
    offline_settings: Callable[..., Settings], http: aiohttp.ClientSession, keys: Keys, json_logs: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = PROVIDER_CASES[0]
    body = orjson.dumps({"authorizationNotifyType": "AUTHCODE_CREATED", "authCode": "CODE-NEVER-LOGGED-4711"})
    capsys.readouterr()
    async with ingress_on_memory(offline_settings(notify_path_prefix="/alipay"), InMemoryPublisher()) as ingress:
        # The prefix is configured, but Alipay was given the plain URL and signed its path.
        plain = notification_headers(keys.alipay.private_key, case, body, key_version="3")
        async with http.post(ingress.url + case.path, data=body, headers=plain) as response:
            assert response.status == 401
        # Signed by another key over the right path.
        other = notification_headers(keys.ours.private_key, case, body, signed_path="/alipay" + case.path)
        async with http.post(ingress.url + case.path, data=body, headers=other) as response:
            assert response.status == 401
    refused = [line for line in log_lines(capsys) if line.get("outcome") == "INVALID_SIGNATURE"]
    assert len(refused) == 2
    wrong_path, wrong_key = refused
    for line in refused:
        assert line["signed_path"] == "/alipay" + case.path and line["client_id"] == case.client_id
    assert wrong_path["key_version"] == "3" and wrong_key["key_version"] == case.key_version
    assert wrong_path["reason"].startswith("signature does not verify: path: the signature verifies over "
                                           f"{case.path}, but the ingress verifies over /alipay{case.path}")
    assert wrong_key["reason"].startswith("signature does not verify: signature over the body: ")
    text = orjson.dumps(refused).decode()
    signatures = [h["Signature"].rpartition("signature=")[2] for h in (plain, other)]
    assert "CODE-NEVER-LOGGED-4711" not in text and not any(s in text for s in signatures)
