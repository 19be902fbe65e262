"""The ingress against the real broker: the status table of docs/ingress.md, row by row, both providers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from authnotify.config import Settings
from authnotify.config.keys import public_key_pem
from authnotify.messaging import headers as messages
from authnotify.messaging.health import HealthServer
from authnotify.observability.logging import configure_logging
from tests.conftest import TestKeys as Keys
from tests.ingress_harness import (
    PROVIDER_CASES,
    SUCCESS_BODY,
    ProviderCase,
    RunningIngress,
    answer_signature_verifies,
    drain_queue,
    epoch_ms_request_time,
    iso_request_time,
    message_counts,
    notification_headers,
    rejection_rows,
    start_ingress,
)

PROVIDERS = pytest.mark.parametrize("case", PROVIDER_CASES, ids=lambda case: case.name)


def token_created(marker: str = "1") -> bytes:
    return orjson.dumps({"authorizationNotifyType": "TOKEN_CREATED", "accessToken": f"tok-{marker}",
                         "result": {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"}})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def start(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """Starts an ingress for this test's namespace (keyword arguments override settings)."""
    running: list[RunningIngress] = []

    async def starter(*, wait_ready: bool = True, **overrides: Any) -> RunningIngress:
        ingress = await start_ingress(make_settings(**overrides), wait_ready=wait_ready)
        running.append(ingress)
        return ingress

    yield starter
    for ingress in running:
        await ingress.stop()


async def post(http: aiohttp.ClientSession, ingress: RunningIngress, case: ProviderCase, body: Any,
               headers: dict[str, str], method: str = "POST") -> tuple[int, dict[str, Any], Any]:
    async with http.request(method, ingress.url + case.path, data=body, headers=headers) as response:
        raw = await response.read()
        return response.status, orjson.loads(raw)["result"], response.headers


@PROVIDERS
async def test_accepted_notification_arrives_byte_for_byte_and_is_answered_with_a_signed_success(
    case: ProviderCase, start: Any, http: aiohttp.ClientSession, keys: Keys,
    amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    ingress = await start()
    # Odd spacing, key order and escapes: the message must carry these exact bytes, not a re-serialisation.
    body = b'{ "authorizationNotifyType" : "TOKEN_CREATED",\n  "accessToken":"t\\u00e9st", "z": 1.50 }'
    async with http.post(ingress.url + case.path, data=body,
                         headers=notification_headers(keys.alipay.private_key, case, body)) as response:
        answer = await response.read()
        assert response.status == 200
        assert answer == SUCCESS_BODY
        assert response.headers["Client-Id"] == case.client_id
        assert answer_signature_verifies(keys.ours.private_key.public_key(), case.path, response.headers, answer)

    [message] = await drain_queue(amqp_connection, f"{ingress.settings.namespace}.token-created", expect=1)
    assert message.body == body
    assert message.routing_key == f"{case.name}.TOKEN_CREATED"
    assert message.exchange == f"{ingress.settings.namespace}.notifications"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert message.message_id is not None and len(message.message_id) == 32
    headers = message.headers
    assert headers[messages.PROVIDER] == case.name
    assert headers[messages.NOTIFY_TYPE] == "TOKEN_CREATED"
    assert headers[messages.ATTEMPT] == 1
    assert str(headers[messages.RECEIVED_AT]).endswith("Z")
    assert await message_counts(amqp_connection, ingress.topology) == {}


@PROVIDERS
async def test_every_rejection_answers_its_row_of_the_status_table_and_publishes_nothing(
    case: ProviderCase, start: Any, http: aiohttp.ClientSession, keys: Keys,
    amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    ingress = await start()
    alipay = keys.alipay.private_key
    body = token_created()
    rows = rejection_rows(case, keys, body)
    for name, method, data, headers, status, code in rows:
        got_status, result, _ = await post(http, ingress, case, data, headers, method)
        expected_status = "U" if status >= 500 or status == 429 else "F"
        assert (got_status, result["resultCode"], result["resultStatus"]) == (status, code, expected_status), name

    # One accepted request afterwards: confirms come in order on the ingress's channel, so anything a
    # rejected request had published would be in a queue by now too.
    status, result, _ = await post(http, ingress, case, body, notification_headers(alipay, case, body))
    assert (status, result["resultStatus"]) == (200, "S")
    assert await message_counts(amqp_connection, ingress.topology) == {
        f"{ingress.settings.namespace}.token-created": 1
    }


async def test_a_body_of_exactly_64_kib_is_accepted(start: Any, http: aiohttp.ClientSession, keys: Keys) -> None:
    ingress = await start()
    case = PROVIDER_CASES[0]
    prefix, suffix = b'{"authorizationNotifyType":"TOKEN_CANCELED","pad":"', b'"}'
    body = prefix + b"x" * (64 * 1024 - len(prefix) - len(suffix)) + suffix
    assert len(body) == 64 * 1024
    status, result, _ = await post(http, ingress, case, body, notification_headers(keys.alipay.private_key, case, body))
    assert (status, result["resultCode"]) == (200, "SUCCESS")


@PROVIDERS
async def test_signatures_as_alipay_sdks_and_docs_send_them_are_accepted(
    case: ProviderCase, start: Any, http: aiohttp.ClientSession, keys: Keys,
    amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    ingress = await start()
    alipay = keys.alipay.private_key
    variants: dict[str, dict[str, Any]] = {
        "lower-case header names": {"lower_case": True},
        "spaces after the commas": {"spaces": True},
        "signature value not URL-encoded": {"url_encode": False},
        "epoch-millisecond Request-Time": {"request_time": epoch_ms_request_time()},
        "ISO 8601 Request-Time": {"request_time": iso_request_time()},
        "ISO 8601 Request-Time with millis and offset": {"request_time": iso_request_time(millis=True, offset_hours=8)},
        "keyVersion 1": {"key_version": "1"},
        "keyVersion 0": {"key_version": "0"},
        "all at once": {"lower_case": True, "spaces": True, "url_encode": False,
                        "request_time": epoch_ms_request_time(), "content_type": "application/json"},
        "charset in any case": {"content_type": "Application/JSON;charset=utf-8"},
    }
    for index, (name, options) in enumerate(variants.items()):
        body = token_created(str(index))
        status, result, _ = await post(http, ingress, case, body, notification_headers(alipay, case, body, **options))
        assert (status, result["resultCode"]) == (200, "SUCCESS"), name
    arrived = await drain_queue(amqp_connection, f"{ingress.settings.namespace}.token-created", expect=len(variants))
    assert sorted(m.body for m in arrived) == sorted(token_created(str(i)) for i in range(len(variants)))


@PROVIDERS
async def test_signed_bodies_without_a_known_type_are_acknowledged_and_kept_in_unrouted(
    case: ProviderCase, start: Any, http: aiohttp.ClientSession, keys: Keys,
    amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    ingress = await start()
    bodies = [
        b"this is not JSON",
        b"\xff\xfe not even UTF-8",
        b'["a", "JSON", "array"]',
        b'"a JSON string"',
        b'{"result": {"resultStatus": "S"}}',
        b'{"authorizationNotifyType": "TOKEN_REFRESHED"}',
        b'{"authorizationNotifyType": 42}',
        b"",
    ]
    for body in bodies:
        status, result, headers = await post(http, ingress, case, body,
                                             notification_headers(keys.alipay.private_key, case, body))
        assert (status, result["resultCode"]) == (200, "SUCCESS"), body
    arrived = await drain_queue(amqp_connection, f"{ingress.settings.namespace}.unrouted", expect=len(bodies))
    assert sorted(m.body for m in arrived) == sorted(bodies)
    for message in arrived:
        assert message.routing_key == f"{case.name}.unknown"
        assert message.headers[messages.NOTIFY_TYPE] == "unknown"
    assert await message_counts(amqp_connection, ingress.topology) == {}


async def test_each_notify_type_is_routed_to_its_queue(
    start: Any, http: aiohttp.ClientSession, keys: Keys, amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    ingress = await start()
    ns = ingress.settings.namespace
    for case in PROVIDER_CASES:
        for notify_type in ("AUTHCODE_CREATED", "TOKEN_CREATED", "TOKEN_CANCELED"):
            body = orjson.dumps({"authorizationNotifyType": notify_type})
            status, _, _ = await post(http, ingress, case, body,
                                      notification_headers(keys.alipay.private_key, case, body))
            assert status == 200
    assert await message_counts(amqp_connection, ingress.topology) == {
        f"{ns}.authcode-created": 2, f"{ns}.token-created": 2, f"{ns}.token-canceled": 2,
    }


async def test_alipay_public_key_rotation_by_key_version(
    start: Any, http: aiohttp.ClientSession, keys: Keys,
) -> None:
    retired = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_map = json.dumps({"1": public_key_pem(retired.public_key()), "2": keys.alipay.public_pem})
    ingress = await start(ams_alipay_public_key=key_map)
    case = PROVIDER_CASES[0]
    body = token_created()
    alipay = keys.alipay.private_key
    status, _, _ = await post(http, ingress, case, body, notification_headers(alipay, case, body, key_version="2"))
    assert status == 200
    # The right key under the wrong version, and a version the map does not hold, both fail.
    for version in ("1", "3"):
        status, result, _ = await post(http, ingress, case, body,
                                       notification_headers(alipay, case, body, key_version=version))
        assert (status, result["resultCode"]) == (401, "INVALID_SIGNATURE"), version
    status, _, _ = await post(http, ingress, case, body, notification_headers(retired, case, body, key_version="1"))
    assert status == 200


async def test_a_provider_without_client_id_has_no_endpoint(
    start: Any, http: aiohttp.ClientSession, keys: Keys, amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    ingress = await start(aps_client_id=None)
    ams, aps = PROVIDER_CASES
    body = token_created()
    status, result, headers = await post(http, ingress, aps, body,
                                         notification_headers(keys.alipay.private_key, aps, body))
    assert (status, result["resultCode"], result["resultStatus"]) == (404, "NO_INTERFACE_DEF", "F")
    assert "Signature" not in headers
    status, _, _ = await post(http, ingress, ams, body, notification_headers(keys.alipay.private_key, ams, body))
    assert status == 200
    assert await message_counts(amqp_connection, ingress.topology) == {
        f"{ingress.settings.namespace}.token-created": 1
    }


async def test_broker_down_answers_503_at_once_and_readyz_says_so(
    start: Any, http: aiohttp.ClientSession, keys: Keys,
) -> None:
    # Nothing listens on port 1: the ingress starts anyway and answers U until a broker is there.
    ingress = await start(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/", wait_ready=False)
    async with http.get(ingress.url + "/healthz") as response:
        assert response.status == 200
    async with http.get(ingress.url + "/readyz") as response:
        assert response.status == 503
    for case in PROVIDER_CASES:
        body = token_created()
        started = time.monotonic()
        status, result, headers = await post(http, ingress, case, body,
                                             notification_headers(keys.alipay.private_key, case, body))
        assert time.monotonic() - started < 1.0
        assert (status, result["resultCode"], result["resultStatus"]) == (503, "UNKNOWN_EXCEPTION", "U")
        assert answer_signature_verifies(keys.ours.private_key.public_key(), case.path, headers,
                                         orjson.dumps({"result": result}))


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


async def test_a_publish_the_broker_nacks_answers_503_and_only_acknowledged_ones_are_kept(
    namespace: str, start: Any, http: aiohttp.ClientSession, keys: Keys,
    amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    # A policy on this namespace's queue only: past max-length, reject-publish makes the broker nack
    # (whatever the queue type: quorum queues declare reject-publish themselves, classic ones get it here).
    # (A quorum queue checks the limit before it enqueues, so it can take one message over the limit.)
    policy = f"{namespace}-full"
    await asyncio.to_thread(_rabbitmqctl, "set_policy", "--apply-to", "queues", policy,
                            f"^{namespace}\\.token-created$", '{"max-length": 1, "overflow": "reject-publish"}')
    try:
        ingress = await start()
        case = PROVIDER_CASES[1]
        answers: list[tuple[int, str, str]] = []
        for index in range(5):
            body = token_created(str(index))
            status, result, _ = await post(http, ingress, case, body,
                                           notification_headers(keys.alipay.private_key, case, body))
            answers.append((status, result["resultCode"], result["resultStatus"]))
            if status != 200:
                break
        assert answers[-1] == (503, "UNKNOWN_EXCEPTION", "U"), answers
        accepted = len(answers) - 1
        assert 1 <= accepted <= 2
        # The channel survives a nack: a notification of another type is still accepted.
        body = orjson.dumps({"authorizationNotifyType": "TOKEN_CANCELED"})
        status, _, _ = await post(http, ingress, case, body, notification_headers(keys.alipay.private_key, case, body))
        assert status == 200
        assert await message_counts(amqp_connection, ingress.topology) == {
            f"{namespace}.token-created": accepted, f"{namespace}.token-canceled": 1,
        }
    finally:
        await asyncio.to_thread(_rabbitmqctl, "clear_policy", policy)


async def test_too_many_publishes_in_flight_answers_429_without_publishing(
    start: Any, http: aiohttp.ClientSession, keys: Keys, amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    ingress = await start(ingress_max_inflight=2)
    limit = ingress.inflight
    # Occupy both slots as two publishes awaiting their confirms would.
    assert limit.try_acquire() and limit.try_acquire()
    case = PROVIDER_CASES[0]
    body = token_created()
    status, result, _ = await post(http, ingress, case, body, notification_headers(keys.alipay.private_key, case, body))
    assert (status, result["resultCode"], result["resultStatus"]) == (429, "REQUEST_TRAFFIC_EXCEED_LIMIT", "U")
    assert await message_counts(amqp_connection, ingress.topology) == {}
    limit.release()
    status, _, _ = await post(http, ingress, case, body, notification_headers(keys.alipay.private_key, case, body))
    assert status == 200
    limit.release()
    assert limit.current == 0


async def test_under_concurrency_every_success_is_in_the_queue_and_the_rest_are_429(
    start: Any, http: aiohttp.ClientSession, keys: Keys, amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    ingress = await start(ingress_max_inflight=1)
    case = PROVIDER_CASES[0]
    bodies = [token_created(str(i)) for i in range(40)]
    requests = [(body, notification_headers(keys.alipay.private_key, case, body)) for body in bodies]
    answers = await asyncio.gather(*(post(http, ingress, case, body, headers) for body, headers in requests))
    accepted = {body for body, (status, _, _) in zip(bodies, answers, strict=True) if status == 200}
    assert {status for status, _, _ in answers} <= {200, 429}
    arrived = await drain_queue(amqp_connection, f"{ingress.settings.namespace}.token-created", expect=len(accepted))
    assert {m.body for m in arrived} == accepted
    assert ingress.inflight.current == 0


async def test_health_readiness_metrics_and_the_log_line(
    start: Any, http: aiohttp.ClientSession, keys: Keys, capsys: pytest.CaptureFixture[str],
    amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    configure_logging("json")
    ingress = await start()
    for path, status in (("/healthz", 200), ("/readyz", 200)):
        async with http.get(ingress.url + path) as response:
            assert response.status == status
    case = PROVIDER_CASES[0]
    body = orjson.dumps({"authorizationNotifyType": "AUTHCODE_CREATED", "authCode": "SECRET-CODE-4711"})
    status, _, _ = await post(http, ingress, case, body, notification_headers(keys.alipay.private_key, case, body))
    assert status == 200
    await post(http, ingress, case, body, {"Content-Type": "application/json"})
    async with http.get(ingress.url + "/metrics") as response:
        assert response.status == 404  # never on the listener Alipay reaches (AUTHNOTIFY_METRICS_PORT has it)
    metrics = HealthServer("127.0.0.1", 0, None, name="metrics")
    await metrics.start()
    try:
        async with http.get(f"http://127.0.0.1:{metrics.port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    finally:
        await metrics.stop()
    assert 'authnotify_notifications_received_total{outcome="SUCCESS",provider="ams"}' in text
    assert 'authnotify_notifications_received_total{outcome="INVALID_CLIENT",provider="ams"}' in text
    assert "authnotify_publish_confirm_seconds_count" in text
    assert "authnotify_broker_connected 1.0" in text
    assert "authnotify_ingress_publishes_in_flight 0.0" in text

    [message] = await drain_queue(amqp_connection, f"{ingress.settings.namespace}.authcode-created", expect=1)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    notifications = [line for line in lines if line.get("event") == "notification"]
    assert {(n["provider"], n["outcome"]) for n in notifications} == {("ams", "SUCCESS"), ("ams", "INVALID_CLIENT")}
    accepted = next(n for n in notifications if n["outcome"] == "SUCCESS")
    assert accepted["message_id"] == message.message_id
    assert all(n["message_id"] for n in notifications)
    assert "SECRET-CODE-4711" not in json.dumps(lines)


def _ingress_cli(env: dict[str, str], cwd: Any) -> subprocess.CompletedProcess[str]:
    import os
    import sys

    clean = {name: value for name, value in os.environ.items() if not name.startswith("AUTHNOTIFY_")}
    return subprocess.run([sys.executable, "-m", "authnotify", "ingress"], env={**clean, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_the_ingress_refuses_to_start_with_no_provider_configured(tmp_path: Any) -> None:
    result = _ingress_cli({}, tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "authnotify: configuration: AUTHNOTIFY_AMS_CLIENT_ID or AUTHNOTIFY_APS_CLIENT_ID: no provider configured "
        "(set at least one)"
    ]


@pytest.mark.slow
def test_the_ingress_names_a_port_it_cannot_listen_on(tmp_path: Any, keys: Keys) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _ingress_cli({
            "AUTHNOTIFY_HTTP_HOST": "127.0.0.1", "AUTHNOTIFY_HTTP_PORT": str(port),
            "AUTHNOTIFY_RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1/",
            "AUTHNOTIFY_AMS_CLIENT_ID": "C", "AUTHNOTIFY_AMS_PRIVATE_KEY": keys.ours.private_pem,
            "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": keys.alipay.public_pem,
        }, tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"authnotify: cannot listen on 127.0.0.1:{port} (address already in use)"]


async def test_header_bytes_that_are_not_utf8_are_refused_not_crashed_on(
    start: Any, keys: Keys, amqp_connection: aio_pika.abc.AbstractConnection,
) -> None:
    ingress = await start()
    case = PROVIDER_CASES[0]
    body = token_created()
    good = notification_headers(keys.alipay.private_key, case, body)
    host, port = ingress.url.removeprefix("http://").split(":")
    variants = [
        ("Request-Time", b"2026-11-23T10:00:00\xff\xfe+08:00", "INVALID_SIGNATURE"),
        ("Signature", b"algorithm=RSA256,keyVersion=1,signature=\xff\xfe", "INVALID_SIGNATURE"),
        ("Client-Id", case.client_id.encode() + b"\xff", "INVALID_CLIENT"),
    ]
    for name, raw_value, code in variants:
        head = b"".join(f"{k}: {v}\r\n".encode() for k, v in good.items() if k != name)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST {case.path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + head
                     + name.encode() + b": " + raw_value + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 401"), (name, answer[:200])
        assert orjson.loads(rest.split(b"\r\n\r\n", 1)[1])["result"]["resultCode"] == code
    assert await message_counts(amqp_connection, ingress.topology) == {}


@pytest.mark.slow
async def test_metrics_answer_on_their_own_port_never_on_the_one_alipay_reaches(tmp_path: Any, keys: Keys) -> None:
    """Issue 10: /metrics answered on the Alipay-facing port."""
    import os
    import socket
    import sys

    def free_port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])

    http_port, metrics_port = free_port(), free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("AUTHNOTIFY_")}
    env.update({"AUTHNOTIFY_HTTP_HOST": "127.0.0.1", "AUTHNOTIFY_HTTP_PORT": str(http_port),
                "AUTHNOTIFY_METRICS_PORT": str(metrics_port), "AUTHNOTIFY_RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1/",
                "AUTHNOTIFY_AMS_CLIENT_ID": "C", "AUTHNOTIFY_AMS_PRIVATE_KEY": keys.ours.private_pem,
                "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": keys.alipay.public_pem})
    process = subprocess.Popen([sys.executable, "-m", "authnotify", "ingress"], env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{http_port}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the ingress did not start"
                await asyncio.sleep(0.1)
            async with http.get(f"http://127.0.0.1:{http_port}/metrics") as response:
                assert response.status == 404
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                assert response.status == 200
                assert "authnotify_broker_connected" in await response.text()
    finally:
        process.terminate()
        process.wait(30)
