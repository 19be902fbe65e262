"""No raw access token, refresh token or auth code leaves the pipeline (docs/operations.md).

A full flow runs through ``authnotify worker`` (all four consumers, a real subprocess, JSON logs captured):
token notifications of both providers, auth codes exchanged at the sandbox Alipay gateway, a cancellation,
invalid bodies that are dead-lettered, a merchant that fails once. Then the log output, the SQLite file, the
dead-lettered messages' reasons and what the merchant received are searched for every raw value.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika
import orjson
import pytest

from authnotify.config import Settings
from authnotify.devtools.sandbox.alipay_gateway import RunningAlipayGateway
from authnotify.devtools.sandbox.merchant_endpoint import RunningMerchantEndpoint, start_merchant_endpoint
from authnotify.domain.merchants import generate_secret
from authnotify.messaging import headers as h
from authnotify.messaging.topology import Consumer, build_topology
from tests.conftest import AMS_CLIENT_ID, APS_CLIENT_ID
from tests.events_harness import (
    ams_token_created,
    aps_token_canceled,
    aps_token_created,
    declare,
    new_token_key,
    publish_notification,
    take_messages,
)

if TYPE_CHECKING:
    from tests.conftest import TestKeys

AMS_RESULT = {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"}


@pytest.fixture
async def merchant() -> AsyncIterator[RunningMerchantEndpoint]:
    running = await start_merchant_endpoint(generate_secret())
    yield running
    await running.aclose()


def distinctive(kind: str) -> str:
    return f"RAW{kind}{uuid.uuid4().hex.upper()}"


async def test_no_raw_token_or_code_in_logs_database_dead_letters_or_merchant_events(
    make_settings: Callable[..., Settings], amqp_connection: aio_pika.abc.AbstractConnection,
    keys: TestKeys, gateway: RunningAlipayGateway, merchant: RunningMerchantEndpoint, tmp_path: Path,
) -> None:
    merchants_file = tmp_path / "merchants.toml"
    merchants_file.write_text(
        f'[merchants.default]\nurl = "{merchant.url_for("/hooks")}"\nsecret = "{merchant.endpoint.secret}"\n'
    )
    token_key = new_token_key()
    database = tmp_path / "secrets.db"
    settings = make_settings(
        database_url=f"sqlite+aiosqlite:///{database}", token_keys=token_key, retry_delays="200ms,400ms",
        ams_gateway_url=gateway.url, aps_gateway_url=gateway.url, merchants_file=merchants_file,
    )
    topology = build_topology(settings)
    channel = await amqp_connection.channel(publisher_confirms=True)
    await declare(channel, settings)

    aps_access, aps_refresh, ams_access = distinctive("APSACCESS"), distinctive("APSREFRESH"), distinctive("AMSACCESS")
    ams_code, aps_code = distinctive("AMSCODE")[:60], distinctive("APSCODE")[:60]
    bad_access, long_code = distinctive("BADACCESS"), distinctive("LONGCODE") * 3  # over 64
    long_token = (distinctive("LONGACCESS") * 4)[:129]
    secrets = [aps_access, aps_refresh, ams_access, ams_code, aps_code, bad_access, long_code, long_token,
               *gateway.gateway.tokens_for("ams", ams_code), *gateway.gateway.tokens_for("aps", aps_code)]

    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env.update({
        "AUTHNOTIFY_RABBITMQ_URL": settings.broker_url(),
        "AUTHNOTIFY_DATABASE_URL": settings.store_url(),
        "AUTHNOTIFY_NAMESPACE": settings.namespace,
        "AUTHNOTIFY_QUEUE_TYPE": settings.queue_type,
        "AUTHNOTIFY_TOKEN_KEYS": token_key,
        "AUTHNOTIFY_WORKER_HTTP_PORT": "0",
        "AUTHNOTIFY_RETRY_DELAYS": "200ms,400ms",
        "AUTHNOTIFY_LOG_FORMAT": "json",
        "AUTHNOTIFY_MERCHANTS_FILE": str(merchants_file),
        "AUTHNOTIFY_AMS_CLIENT_ID": AMS_CLIENT_ID,
        "AUTHNOTIFY_AMS_PRIVATE_KEY": keys.ours.private_pem,
        "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": keys.alipay.public_pem,
        "AUTHNOTIFY_AMS_GATEWAY_URL": gateway.url,
        "AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO": "ALIPAY_CN",
        "AUTHNOTIFY_APS_CLIENT_ID": APS_CLIENT_ID,
        "AUTHNOTIFY_APS_PRIVATE_KEY": keys.ours.private_pem,
        "AUTHNOTIFY_APS_ALIPAY_PUBLIC_KEY": keys.alipay.public_pem,
        "AUTHNOTIFY_APS_GATEWAY_URL": gateway.url,
    })
    log = tmp_path / "workers.log"
    merchant.endpoint.fail(1, status=503)  # one retry, so a failure reason is logged too
    with log.open("wb") as log_file:
        worker = subprocess.Popen([sys.executable, "-m", "authnotify", "worker"], env=env, cwd=tmp_path,
                                  stdout=log_file, stderr=subprocess.STDOUT)
        try:
            await publish_notification(channel, settings, "aps", aps_token_created(aps_access, refreshToken=aps_refresh))
            await publish_notification(channel, settings, "ams", ams_token_created(ams_access))
            await publish_notification(channel, settings, "ams", {
                "authorizationNotifyType": "AUTHCODE_CREATED", "authCode": ams_code,
                "authState": "state-1", "result": AMS_RESULT})
            await publish_notification(channel, settings, "aps", {
                "authorizationNotifyType": "AUTHCODE_CREATED", "authClientId": "218823863726123456789",
                "referenceMerchantId": "218823863726123456780", "authCode": aps_code,
                "authState": "state-2", "referenceAgreementId": "agreement-secrets",
                "acquirerId": "1021234567891230001", "pspId": "1021234567891230002"})
            # Invalid: dead-lettered with reasons that must not echo the values.
            await publish_notification(channel, settings, "aps", aps_token_created(bad_access, referenceMerchantId="M" * 40))
            await publish_notification(channel, settings, "aps", aps_token_created(long_token))
            await publish_notification(channel, settings, "ams", {
                "authorizationNotifyType": "AUTHCODE_CREATED", "authCode": long_code, "result": AMS_RESULT})

            await merchant.endpoint.wait_until(lambda e: len(e.delivered) >= 4, timeout=30)
            await publish_notification(channel, settings, "aps", aps_token_canceled(aps_access))
            await merchant.endpoint.wait_until(
                lambda e: any(r.event["type"] == "authorization.canceled" for r in e.delivered), timeout=30)
            dead = await take_messages(channel, topology.dead_letter_queue(Consumer.TOKEN_CREATED), 2, timeout=30)
            dead += await take_messages(channel, topology.dead_letter_queue(Consumer.AUTHCODE_CREATED), 1, timeout=30)
        finally:
            worker.send_signal(signal.SIGTERM)
            exit_code = worker.wait(30)
    assert exit_code == 0

    logged = log.read_text()
    assert "message_processed" in logged and "answered HTTP 503" in logged
    # One line per message, naming the authorization by fingerprint (what handlers annotate), never by token.
    processed = [orjson.loads(line) for line in logged.splitlines()
                 if line.startswith("{") and '"message_processed"' in line]
    assert processed and all(line.get("message_id") for line in processed)
    assert {line["consumer"] for line in processed if line.get("fingerprint")} >= {"token-created", "token-canceled"}
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("secrets.db*"))
    assert len(stored) > 0
    reasons = " ".join(str(m.headers.get(h.DEAD_REASON)) for m in dead)
    assert "at most" in reasons
    delivered = b" ".join(r.body for r in merchant.endpoint.requests)
    assert len({r.webhook_id for r in merchant.endpoint.delivered}) == 5
    for secret in secrets:
        assert secret not in logged, "a raw value in the worker logs"
        assert secret.encode() not in stored, "a raw value in the database file"
        assert secret not in reasons, "a raw value in a dead-letter reason"
        assert secret.encode() not in delivered, "a raw value in a merchant event"


# --- settings and start-up lines (issue 6) ------------------------------------------------------------

BROKER_PASSWORD = "BrokerPw" + uuid.uuid4().hex[:12]
DATABASE_PASSWORD = "DatabasePw" + uuid.uuid4().hex[:12]


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _secret_environment(keys: TestKeys, tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    from cryptography.fernet import Fernet

    token_key = Fernet.generate_key().decode()
    merchant_secret = generate_secret()
    merchants = tmp_path / "merchants.toml"
    merchants.write_text(f'[merchants.default]\nurl = "http://127.0.0.1:9/h"\nsecret = "{merchant_secret}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env.update({
        # Nothing listens on port 1: every process starts, logs its start-up lines, and keeps retrying.
        "AUTHNOTIFY_RABBITMQ_URL": f"amqp://authnotify:{BROKER_PASSWORD}@127.0.0.1:1/",
        "AUTHNOTIFY_DATABASE_URL": f"postgresql://authnotify:{DATABASE_PASSWORD}@127.0.0.1:1/authnotify?sslmode=require",
        "AUTHNOTIFY_TOKEN_KEYS": token_key,
        "AUTHNOTIFY_MERCHANTS_FILE": str(merchants),
        "AUTHNOTIFY_AMS_CLIENT_ID": AMS_CLIENT_ID,
        "AUTHNOTIFY_AMS_PRIVATE_KEY": keys.ours.private_pem,
        "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": keys.alipay.public_pem,
        "AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO": "ALIPAY_CN",
        "AUTHNOTIFY_HTTP_HOST": "127.0.0.1",
        "AUTHNOTIFY_HTTP_PORT": str(_free_port()),
        "AUTHNOTIFY_METRICS_PORT": str(_free_port()),
        "AUTHNOTIFY_WORKER_HTTP_PORT": "0",
        "AUTHNOTIFY_LOG_FORMAT": "json",
        "AUTHNOTIFY_SIMULATE_ALIPAY_PRIVATE_KEY": keys.alipay.private_pem,
    })
    private_body = "".join(keys.ours.private_pem.splitlines()[1:-1])
    alipay_body = "".join(keys.alipay.private_pem.splitlines()[1:-1])
    secrets = [BROKER_PASSWORD, DATABASE_PASSWORD, token_key, merchant_secret, merchant_secret.removeprefix("whsec_"),
               private_body[64:128], alipay_body[64:128], "PRIVATE KEY"]
    return env, secrets


def test_no_settings_object_shows_a_secret(keys: TestKeys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from authnotify.config import DevSettings, Need, Settings, SimulateSettings, check_needs, load

    env, secrets = _secret_environment(keys, tmp_path)
    for name, value in env.items():
        if name.startswith("AUTHNOTIFY_"):
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    settings = load(Settings)
    check_needs(settings, set(Need))  # every secret read and parsed, as a process that needs all would
    shown = [repr(settings), str(settings), repr(settings.model_dump()), repr(settings.providers()),
             repr(settings.token_keys), repr(load(DevSettings)), repr(load(SimulateSettings)),
             str(load(SimulateSettings).model_dump())]
    for text in shown:
        for secret in secrets:
            assert secret not in text, (secret[:12], text[:200])


@pytest.mark.slow
@pytest.mark.parametrize("command", [["ingress"], ["worker"], ["worker", "merchant-events"], ["topology"],
                                     ["migrate"], ["dlq", "list"], ["authorizations", "list"],
                                     ["reencrypt-tokens"]])
def test_no_start_up_line_or_error_shows_a_secret(keys: TestKeys, tmp_path: Path, command: list[str]) -> None:
    env, secrets = _secret_environment(keys, tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "authnotify", *command], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=4)
    except subprocess.TimeoutExpired:  # a service, still retrying the broker: stop it and read what it said
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    text = output.decode("utf-8", "replace")
    assert text.strip(), "the command said nothing"
    assert "configuration" not in text, text  # it got past its configuration: what follows is its own output
    if command[0] == "ingress":
        assert "ingress_listening" in text, text[-500:]
    for secret in secrets:
        assert secret not in text, (command, secret[:12], text[-500:])
