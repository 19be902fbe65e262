"""Alipay+ ``consultUnbinding`` on the ingress: checked exactly like ``authNotify`` (the same pipeline and
status table), answered at once, signed, from the merchant registry's ``allow_unbinding``; nothing published,
no database."""

from __future__ import annotations

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
    ingress_on_memory,
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
