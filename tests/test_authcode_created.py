"""The authcode-created worker on the real broker and real databases, against the sandbox Alipay gateway.

AUTHCODE_CREATED → applyToken → stored authorization → one ``authorization.activated`` in
``{ns}.merchant-events``; every applyToken outcome maps to store, dead-letter or retry; a code is exchanged
once however often its notification arrives; no raw code or token ever reaches a log line or a reason.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aio_pika
import pytest
from cryptography.fernet import Fernet

from authnotify.alipay.client import AMS_SANDBOX_APPLY_TOKEN_PATH, APS_APPLY_TOKEN_PATH
from authnotify.config import Settings
from authnotify.devtools.sandbox.alipay_gateway import Outcome, RunningAlipayGateway
from authnotify.domain.authorizations import access_token_fingerprint
from authnotify.domain.events import MerchantEvent
from authnotify.errors import ConfigError
from authnotify.messaging import headers as h
from authnotify.messaging.topology import Consumer, build_topology
from authnotify.store import SqlStore as Store
from authnotify.workers import authcode_created
from authnotify.workers.process import Workers
from authnotify.workers.resources import Resources
from tests.conftest import AMS_CLIENT_ID
from tests.events_harness import eventually, metric, publish_notification, take_all, take_messages

if TYPE_CHECKING:
    from tests.conftest import TestKeys

FAST_RETRIES = "200ms,400ms"  # 3 attempts
PROCESSED = "authnotify_messages_processed_total"
ACTIVATED = "authorization.activated"


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def settings_for(make_settings: Callable[..., Settings], gateway: RunningAlipayGateway,
                 tmp_path: Any) -> Callable[..., Settings]:
    token_key = Fernet.generate_key().decode()

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/authcode.db",
            "ams_gateway_url": gateway.url,
            "aps_gateway_url": gateway.url,
            "token_keys": token_key,
            "retry_delays": FAST_RETRIES,
        }
        values.update(overrides)
        return make_settings(**values)

    return factory


@asynccontextmanager
async def running_worker(settings: Settings, *, apply_token_timeout: float = 5.0) -> AsyncIterator[Workers]:
    """The authcode-created consumer through the real runtime, in this process."""
    resources = Resources(settings)
    try:
        spec = await authcode_created.consumer(resources, apply_token_timeout=apply_token_timeout)
        runtime = Workers(settings, [spec], http_port=0)
        await runtime.start()
        try:
            await runtime.wait_ready(20)
            yield runtime
        finally:
            await runtime.stop()
    finally:
        await resources.aclose()


@pytest.fixture
async def channel(amqp_connection: aio_pika.abc.AbstractConnection) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    opened = await amqp_connection.channel(publisher_confirms=True)
    yield opened
    await opened.close()


@asynccontextmanager
async def opened_store(settings: Settings) -> AsyncIterator[Store]:
    store = await Store.connect(settings.store_url(), settings.token_keys)
    try:
        yield store
    finally:
        await store.close()


# --- notifications ----------------------------------------------------------------------------------


def new_code() -> str:
    return "281010133AB2F588" + uuid.uuid4().hex[:16].upper()


def ams_body(auth_code: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "authorizationNotifyType": "AUTHCODE_CREATED",
        "authCode": auth_code,
        "authState": "663A8FA9-D836-48EE-8AA1-1FF682989DC7",
        "userLoginId": "62-34312736",
        "result": {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"},
    }
    body.update(fields)
    return body


def aps_body(auth_code: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "authorizationNotifyType": "AUTHCODE_CREATED",
        "authClientId": "218823863726123456789",
        "referenceMerchantId": "218823863726123456780",
        "authCode": auth_code,
        "authState": "663A8FA9-D836-48EE-8AA1-1FF682989DC7",
        "referenceAgreementId": f"agreement-{uuid.uuid4().hex[:12]}",
        "acquirerId": "1021234567891230001",
        "pspId": "1021234567891230002",
    }
    body.update(fields)
    return body


BODIES = {"ams": ams_body, "aps": aps_body}


def processed(outcome: str) -> float:
    return metric(PROCESSED, queue=Consumer.AUTHCODE_CREATED.value, outcome=outcome)


async def dead_letters(channel: aio_pika.abc.AbstractChannel, settings: Settings,
                       count: int = 1) -> list[aio_pika.abc.AbstractIncomingMessage]:
    return await take_messages(channel, build_topology(settings).dead_letter_queue(Consumer.AUTHCODE_CREATED),
                               count)


def merchant_events_queue(settings: Settings) -> str:
    return build_topology(settings).consumer_queue(Consumer.MERCHANT_EVENTS)


# --- the happy path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["ams", "aps"])
async def test_authcode_created_ends_in_a_stored_authorization_and_one_activated_event(
    provider: str, database_url: str, settings_for: Callable[..., Settings], gateway: RunningAlipayGateway,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    settings = settings_for(database_url=database_url)
    code = new_code()
    body = BODIES[provider](code)
    async with running_worker(settings):
        await publish_notification(channel, settings, provider, body)
        (message,) = await take_messages(channel, merchant_events_queue(settings), 1)

    access_token, _refresh = gateway.gateway.tokens_for(provider, code)
    fingerprint = access_token_fingerprint(access_token)
    event = MerchantEvent.model_validate_json(message.body)
    assert event.type == ACTIVATED and message.message_id == event.id
    assert message.headers[h.NOTIFY_TYPE] == ACTIVATED
    data = event.data
    assert (data.provider, data.status, data.accessTokenFingerprint) == (provider, "active", fingerprint)
    assert data.authState == body["authState"]
    assert data.accessTokenExpiryTime and data.refreshTokenExpiryTime and data.customerId and data.userLoginId
    if provider == "aps":
        assert (data.authClientId, data.referenceMerchantId, data.referenceAgreementId) == (
            body["authClientId"], body["referenceMerchantId"], body["referenceAgreementId"])
    assert gateway.gateway.calls[code] == 1
    (call,) = gateway.gateway.requests
    # The test AMS client id starts with SANDBOX_: the sandbox path.
    assert call.path == (AMS_SANDBOX_APPLY_TOKEN_PATH if provider == "ams" else APS_APPLY_TOKEN_PATH)

    async with opened_store(settings) as store:
        stored = await store.find_code_exchange(provider, code)
        assert stored == data
        assert await store.tokens_of(provider, fingerprint) == gateway.gateway.tokens_for(provider, code)


async def test_the_same_notification_three_times_calls_apply_token_once_with_one_event_id(
    database_url: str, settings_for: Callable[..., Settings], gateway: RunningAlipayGateway,
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    settings = settings_for(database_url=database_url)
    code = new_code()
    body = aps_body(code)
    before = processed("ok")
    async with running_worker(settings):
        # Alipay's redeliveries: three separate requests, so three messages, handled concurrently.
        for _ in range(3):
            await publish_notification(channel, settings, "aps", body)
        await eventually(lambda: _true(processed("ok") >= before + 3), what="three messages processed")
        first = await take_all(channel, merchant_events_queue(settings))
        # An operator's replay of one of them: the event may have been lost, so it is emitted again.
        await publish_notification(channel, settings, "aps", body, headers={h.REPLAYED: 1})
        (replayed,) = await take_messages(channel, merchant_events_queue(settings), 1)

    assert gateway.gateway.calls[code] == 1
    assert len(first) == 1
    assert replayed.message_id == first[0].message_id
    assert MerchantEvent.model_validate_json(replayed.body) == MerchantEvent.model_validate_json(first[0].body)


async def _true(value: bool) -> bool:
    return value


# --- applyToken outcomes ------------------------------------------------------------------------------


async def test_apply_token_f_dead_letters_at_once_with_the_result_code(
    settings_for: Callable[..., Settings], gateway: RunningAlipayGateway, channel: aio_pika.abc.AbstractChannel,
) -> None:
    settings = settings_for()
    code = new_code()
    gateway.gateway.script(Outcome.failure("INVALID_CODE"), auth_code=code)
    async with running_worker(settings):
        await publish_notification(channel, settings, "ams", ams_body(code))
        (dead,) = await dead_letters(channel, settings)
    assert dead.headers[h.DEAD_REASON] == "applyToken answered F INVALID_CODE"
    assert dead.headers[h.DEAD_ATTEMPTS] == 1
    assert gateway.gateway.calls[code] == 1
    assert await take_all(channel, merchant_events_queue(settings)) == []
    async with opened_store(settings) as store:
        assert await store.find_code_exchange("ams", code) is None


@pytest.mark.parametrize(
    ("outcome", "reason_part", "timeout"),
    [
        (Outcome.unknown(), "applyToken answered U UNKNOWN_EXCEPTION", 5.0),
        (Outcome.http_error(500), "HTTP 500", 5.0),
        (Outcome.http_error(502), "HTTP 502", 5.0),
        (Outcome.slow(1.5), "timed out", 0.3),
        (Outcome.bad_signature(), "no valid Alipay signature", 5.0),
    ],
    ids=["U", "http-500", "http-502", "timeout", "bad-signature"],
)
async def test_transient_apply_token_failures_retry_then_dead_letter(
    outcome: Outcome, reason_part: str, timeout: float, settings_for: Callable[..., Settings],
    gateway: RunningAlipayGateway, channel: aio_pika.abc.AbstractChannel,
) -> None:
    settings = settings_for()
    code = new_code()
    gateway.gateway.script(outcome, auth_code=code)
    retried_before = processed("retried")
    async with running_worker(settings, apply_token_timeout=timeout):
        await publish_notification(channel, settings, "aps", aps_body(code))
        (dead,) = await dead_letters(channel, settings)
    assert reason_part in dead.headers[h.DEAD_REASON]
    assert code not in dead.headers[h.DEAD_REASON]
    assert dead.headers[h.DEAD_ATTEMPTS] == 3
    assert gateway.gateway.calls[code] == 3  # first attempt and two retries
    assert processed("retried") == retried_before + 2
    assert await take_all(channel, merchant_events_queue(settings)) == []


async def test_a_transient_failure_then_success_stores_once(
    settings_for: Callable[..., Settings], gateway: RunningAlipayGateway, channel: aio_pika.abc.AbstractChannel,
) -> None:
    settings = settings_for()
    code = new_code()
    gateway.gateway.script(Outcome.http_error(503), auth_code=code, times=1)
    gateway.gateway.script(Outcome.unknown(), auth_code=code, times=1)
    async with running_worker(settings):
        await publish_notification(channel, settings, "ams", ams_body(code))
        (message,) = await take_messages(channel, merchant_events_queue(settings), 1)
    assert gateway.gateway.calls[code] == 3
    event = MerchantEvent.model_validate_json(message.body)
    assert event.data.accessTokenFingerprint == access_token_fingerprint(gateway.gateway.tokens_for("ams", code)[0])


# --- invalid bodies and configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "change", "field"),
    [
        ("ams", {"authCode": "A" * 65}, "authCode"),
        ("aps", {"referenceMerchantId": "2" * 33}, "referenceMerchantId"),
        ("ams", {"authCode": None}, "authCode"),
        ("aps", {"authCode": None}, "authCode"),
        ("aps", {"referenceAgreementId": None}, "referenceAgreementId"),
    ],
    ids=["ams-authCode-over-64", "aps-referenceMerchantId-over-32", "ams-authCode-missing",
         "aps-authCode-missing", "aps-referenceAgreementId-missing"],
)
async def test_invalid_bodies_dead_letter_with_a_reason_naming_the_field(
    provider: str, change: dict[str, Any], field: str, settings_for: Callable[..., Settings],
    gateway: RunningAlipayGateway, channel: aio_pika.abc.AbstractChannel,
) -> None:
    settings = settings_for()
    body = BODIES[provider](new_code())
    for name, value in change.items():
        if value is None:
            del body[name]
        else:
            body[name] = value
    async with running_worker(settings):
        await publish_notification(channel, settings, provider, body)
        (dead,) = await dead_letters(channel, settings)
    reason = dead.headers[h.DEAD_REASON]
    assert reason.startswith(f"{field}:"), reason
    assert "A" * 65 not in reason
    assert dead.headers[h.DEAD_ATTEMPTS] == 1
    assert gateway.gateway.requests == []


async def test_a_provider_without_a_client_id_dead_letters_with_a_clear_reason(
    settings_for: Callable[..., Settings], gateway: RunningAlipayGateway, channel: aio_pika.abc.AbstractChannel,
) -> None:
    settings = settings_for(aps_client_id=None, aps_private_key=None, aps_alipay_public_key=None)
    async with running_worker(settings):
        await publish_notification(channel, settings, "aps", aps_body(new_code()))
        (dead,) = await dead_letters(channel, settings)
    assert "AUTHNOTIFY_APS_CLIENT_ID is not set" in dead.headers[h.DEAD_REASON]
    assert gateway.gateway.requests == []


async def test_ams_without_customer_belongs_to_fails_the_start(settings_for: Callable[..., Settings]) -> None:
    resources = Resources(settings_for(ams_customer_belongs_to=None))
    try:
        with pytest.raises(ConfigError, match="^AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO: "):
            await authcode_created.consumer(resources)
    finally:
        await resources.aclose()


@pytest.mark.slow
def test_the_cli_worker_refuses_to_start_without_customer_belongs_to(keys: TestKeys, tmp_path: Any) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AUTHNOTIFY_AMS_CLIENT_ID": AMS_CLIENT_ID,
        "AUTHNOTIFY_AMS_PRIVATE_KEY": keys.ours.private_pem,
        "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": keys.alipay.public_pem,
        "AUTHNOTIFY_TOKEN_KEYS": Fernet.generate_key().decode(),
        "AUTHNOTIFY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/cli.db",
        "AUTHNOTIFY_WORKER_HTTP_PORT": "0",
    }
    done = subprocess.run([sys.executable, "-m", "authnotify", "worker", "authcode-created"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO" in lines[0], done.stderr


# --- secrets ----------------------------------------------------------------------------------------


async def test_no_raw_auth_code_or_token_in_logs_reasons_or_events(
    settings_for: Callable[..., Settings], gateway: RunningAlipayGateway, channel: aio_pika.abc.AbstractChannel,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, json_logs: None,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = settings_for()
    good, failed, unknown = new_code(), new_code(), new_code()
    gateway.gateway.script(Outcome.failure("INVALID_CODE"), auth_code=failed)
    gateway.gateway.script(Outcome.unknown(), auth_code=unknown)
    async with running_worker(settings):
        await publish_notification(channel, settings, "aps", aps_body(good))
        await publish_notification(channel, settings, "ams", ams_body(failed))
        await publish_notification(channel, settings, "aps", aps_body(unknown))
        (event,) = await take_messages(channel, merchant_events_queue(settings), 1)
        dead = await dead_letters(channel, settings, 2)
        await publish_notification(channel, settings, "aps", aps_body(good), headers={h.REPLAYED: 1})
        await take_messages(channel, merchant_events_queue(settings), 1)
    captured = capsys.readouterr()
    text = "\n".join([captured.out, captured.err, caplog.text, event.body.decode(),
                      *(str(m.headers) for m in dead)])
    assert '"code_exchange":"exchanged"' in text and "message_failed" in text
    secrets = [good, failed, unknown, *gateway.gateway.tokens_for("aps", good)]
    for secret in secrets:
        assert secret not in text
