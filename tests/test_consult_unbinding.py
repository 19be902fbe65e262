"""Alipay+ ``consultUnbinding`` on the ingress: checked exactly like ``authNotify`` (the same pipeline and
status table), answered at once, signed, from the merchant registry's ``allow_unbinding``; nothing published,
no database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from authnotify.alipay.notifications import CONSULT_UNBINDING_PATH
from authnotify.config import Settings
from authnotify.domain.merchants import generate_secret
from authnotify.errors import ConfigError
from authnotify.ingress.app import create_app
from authnotify.messaging.memory import InMemoryPublisher
from tests.conftest import APS_CLIENT_ID
from tests.conftest import TestKeys as Keys
from tests.ingress_harness import (
    ProviderCase,
    answer_signature_verifies,
    epoch_ms_request_time,
    ingress_on_memory,
    iso_request_time,
    notification_headers,
    rejection_rows,
)

CONSULT = ProviderCase("aps consultUnbinding", CONSULT_UNBINDING_PATH, APS_CLIENT_ID, "0")


def registry(tmp_path: Path, default_allows: bool | None = None) -> Path:
    secret = generate_secret()
    default = f'[merchants.default]\nurl = "https://m.example/h"\nsecret = "{secret}"\n'
    if default_allows is not None:
        default += f"allow_unbinding = {str(default_allows).lower()}\n"
    path = tmp_path / "merchants.toml"
    path.write_text(default
                    + f'[merchants."M-REFUSES"]\nurl = "https://m.example/h"\nsecret = "{secret}"\n'
                      "allow_unbinding = false\n"
                    + f'[merchants."C-REFUSES"]\nurl = "https://m.example/h"\nsecret = "{secret}"\n'
                      "allow_unbinding = false\n"
                    + f'[merchants."M-ALLOWS"]\nurl = "https://m.example/h"\nsecret = "{secret}"\n'
                      "allow_unbinding = true\n")
    return path


def consultation(reference_merchant_id: str, auth_client_id: str) -> bytes:
    return orjson.dumps({"authClientId": auth_client_id, "referenceMerchantId": reference_merchant_id,
                         "accessToken": "2810ACCESS-TOKEN-NEVER-LOGGED", "acquirerId": "1021234567891230001",
                         "pspId": "1021234567891230002"})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.mark.parametrize(("merchant", "client", "allowed"), [
    ("M-ANY", "C-ANY", "true"),  # no entry: the default, which allows
    ("M-REFUSES", "C-ANY", "false"),  # matched by referenceMerchantId
    ("M-ANY", "C-REFUSES", "false"),  # then by authClientId
    ("M-ALLOWS", "C-REFUSES", "true"),  # referenceMerchantId first
])
async def test_the_registry_decides_and_the_answer_is_signed(
        merchant: str, client: str, allowed: str, offline_settings: Callable[..., Settings], keys: Keys,
        http: aiohttp.ClientSession, tmp_path: Path, json_logs: None, capsys: pytest.CaptureFixture[str]) -> None:
    publisher = InMemoryPublisher()
    body = consultation(merchant, client)
    async with ingress_on_memory(offline_settings(merchants_file=str(registry(tmp_path))), publisher) as ingress:
        async with http.post(ingress.url + CONSULT_UNBINDING_PATH, data=body,
                             headers=notification_headers(keys.alipay.private_key, CONSULT, body)) as response:
            raw = await response.read()
            headers = response.headers
    assert response.status == 200
    assert orjson.loads(raw) == {"result": {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"},
                                 "allowUnbinding": allowed}
    assert headers["Client-Id"] == APS_CLIENT_ID
    assert answer_signature_verifies(keys.ours.private_key.public_key(), CONSULT_UNBINDING_PATH, headers, raw)
    assert publisher.published == []
    logs = capsys.readouterr().err
    assert "unbinding_consultation" in logs and "2810ACCESS-TOKEN-NEVER-LOGGED" not in logs


async def test_without_a_registry_unbinding_is_allowed_and_a_refusing_default_refuses(
        offline_settings: Callable[..., Settings], keys: Keys, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    answers = []
    for settings in (offline_settings(), offline_settings(merchants_file=str(registry(tmp_path, False)))):
        body = consultation("M-ANY", "C-ANY")
        async with ingress_on_memory(settings, InMemoryPublisher()) as ingress:
            async with http.post(ingress.url + CONSULT_UNBINDING_PATH, data=body,
                                 headers=notification_headers(keys.alipay.private_key, CONSULT, body)) as response:
                answers.append(orjson.loads(await response.read())["allowUnbinding"])
    assert answers == ["true", "false"]


async def test_every_failed_check_answers_the_status_table_and_publishes_nothing(
        offline_settings: Callable[..., Settings], keys: Keys, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    publisher = InMemoryPublisher()
    body = consultation("M-REFUSES", "C-ANY")
    async with ingress_on_memory(offline_settings(merchants_file=str(registry(tmp_path))), publisher) as ingress:
        for name, method, data, headers, status, code in rejection_rows(CONSULT, keys, body):
            async with http.request(method, ingress.url + CONSULT_UNBINDING_PATH, data=data,
                                    headers=headers) as response:
                answer: dict[str, Any] = orjson.loads(await response.read())
            assert (response.status, answer["result"]["resultCode"]) == (status, code), name
            assert "allowUnbinding" not in answer, name
    assert publisher.published == []


async def test_an_unreadable_body_that_verifies_is_answered_by_the_default(
        offline_settings: Callable[..., Settings], keys: Keys, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    body = b"[1, 2"
    async with ingress_on_memory(offline_settings(merchants_file=str(registry(tmp_path))),
                                 InMemoryPublisher()) as ingress:
        async with http.post(ingress.url + CONSULT_UNBINDING_PATH, data=body,
                             headers=notification_headers(keys.alipay.private_key, CONSULT, body)) as response:
            assert response.status == 200
            assert orjson.loads(await response.read())["allowUnbinding"] == "true"


def test_a_bad_allow_unbinding_stops_the_start_in_one_line(offline_settings: Callable[..., Settings],
                                                            tmp_path: Path) -> None:
    path = tmp_path / "merchants.toml"
    path.write_text(f'[merchants.default]\nurl = "https://m.example/h"\nsecret = "{generate_secret()}"\n'
                    'allow_unbinding = "no"\n')
    with pytest.raises(ConfigError, match=r"\[merchants.default\] allow_unbinding must be true or false"):
        create_app(offline_settings(merchants_file=str(path)), publisher=InMemoryPublisher())


TOLERANCE = 26 * 3600  # AUTHNOTIFY_REQUEST_TIME_TOLERANCE's default


async def _consult(http: aiohttp.ClientSession, url: str, body: bytes,
                   headers: dict[str, str]) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    async with http.post(url + CONSULT_UNBINDING_PATH, data=body, headers=headers) as response:
        return response.status, orjson.loads(await response.read()), time.monotonic() - started


@pytest.mark.parametrize("form", ["iso", "epoch-ms"])
async def test_request_time_outside_the_window_is_refused_like_a_notification(
        form: str, offline_settings: Callable[..., Settings], keys: Keys, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    """The one check pipeline: a captured consultation does not replay for ever, whatever path it was for."""
    def at(shift: float) -> str:
        return iso_request_time(shift_seconds=shift, offset_hours=8) if form == "iso" else epoch_ms_request_time(shift)

    publisher = InMemoryPublisher()
    body = consultation("M-REFUSES", "C-ANY")
    edges = [(-TOLERANCE + 60, 200), (-TOLERANCE - 60, 401), (9 * 60, 200), (11 * 60, 401)]
    async with ingress_on_memory(offline_settings(merchants_file=str(registry(tmp_path))), publisher) as ingress:
        for shift, expected in edges:
            headers = notification_headers(keys.alipay.private_key, CONSULT, body, request_time=at(shift))
            status, answer, _ = await _consult(http, ingress.url, body, headers)
            assert status == expected, (form, shift)
            if expected == 401:
                assert (answer["result"]["resultCode"], answer["result"]["resultStatus"]) == ("INVALID_SIGNATURE", "F")
                assert "allowUnbinding" not in answer
            else:
                assert answer["allowUnbinding"] == "false"
        for value in ("2001-01-01T00:00:00+00:00", "not-a-time", "4070908800000"):
            headers = notification_headers(keys.alipay.private_key, CONSULT, body, request_time=value)
            status, answer, _ = await _consult(http, ingress.url, body, headers)
            assert (status, answer["result"]["resultCode"]) == (401, "INVALID_SIGNATURE"), value
    assert publisher.published == []


async def test_a_consultation_is_held_to_the_body_budget_of_the_notify_paths(
        offline_settings: Callable[..., Settings], keys: Keys, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """The same process-wide byte budget: with it spent, a consultation is answered 503 U (Alipay asks again)."""
    from authnotify.ingress.checks import BodyBudget

    body = consultation("M-ANY", "C-ANY")
    budget = BodyBudget(len(body) // 2)
    async with ingress_on_memory(offline_settings(merchants_file=str(registry(tmp_path))), InMemoryPublisher(),
                                 body_budget=budget) as ingress:
        status, answer, _ = await _consult(http, ingress.url, body,
                                           notification_headers(keys.alipay.private_key, CONSULT, body))
    assert (status, answer["result"]["resultCode"], answer["result"]["resultStatus"]) == (503, "UNKNOWN_EXCEPTION", "U")
    assert "allowUnbinding" not in answer
    assert budget.held == 0


async def test_a_consultation_is_answered_at_once_without_the_broker(
        offline_settings: Callable[..., Settings], keys: Keys, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Alipay+ waits 5 s at most: the answer depends on nothing but the registry (no publish, no database)."""
    publisher = InMemoryPublisher()
    publisher.failure = "broker unavailable"  # a notification would be answered 503 now
    body = consultation("M-ALLOWS", "C-REFUSES")
    async with ingress_on_memory(offline_settings(merchants_file=str(registry(tmp_path))), publisher) as ingress:
        answers = await asyncio.gather(*(
            _consult(http, ingress.url, body, notification_headers(keys.alipay.private_key, CONSULT, body))
            for _ in range(20)))
    assert {(status, answer["allowUnbinding"]) for status, answer, _ in answers} == {(200, "true")}
    assert max(elapsed for _, _, elapsed in answers) < 5
    assert publisher.published == []


@pytest.mark.slow  # waits on the body timeout
async def test_a_consultation_whose_body_does_not_arrive_in_time_is_answered_408_u(
        offline_settings: Callable[..., Settings], keys: Keys, tmp_path: Path) -> None:
    body = consultation("M-ANY", "C-ANY")
    headers = notification_headers(keys.alipay.private_key, CONSULT, body)
    settings = offline_settings(merchants_file=str(registry(tmp_path)), ingress_body_timeout="300ms")
    async with ingress_on_memory(settings, InMemoryPublisher()) as ingress:
        host, port = ingress.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(f"POST {CONSULT_UNBINDING_PATH} HTTP/1.1\r\nHost: x\r\n{head}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: the ingress closes the connection
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408")
    document = orjson.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert (document["result"]["resultCode"], document["result"]["resultStatus"]) == ("UNKNOWN_EXCEPTION", "U")
    assert "allowUnbinding" not in document
