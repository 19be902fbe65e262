"""No token leaves except through ``POST .../access-token``: a whole lifecycle on the real broker and SQLite
(an auth code exchanged, a TOKEN_CREATED, refreshes, an expiry, a revocation, the API's every route), with
every log line, merchant event, dead letter, metric, CLI output and API answer scanned for every token and
code that went through it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from authnotify.api.app import create_api_app
from authnotify.api.keys import new_api_key, parse_api_keys
from authnotify.cli.main import main
from authnotify.config import Settings
from authnotify.devtools.sandbox.alipay_gateway import Outcome, RunningAlipayGateway
from authnotify.domain.authorizations import access_token_fingerprint
from authnotify.messaging.connection import Broker
from authnotify.messaging.publisher import ConfirmedPublisher
from authnotify.messaging.topology import Consumer, build_topology
from authnotify.observability.metrics import render_metrics
from authnotify.scheduler.process import Scheduler, schedule_of
from authnotify.store import SqlStore
from tests.events_harness import aps_token_created, eventually, metric, publish_notification, running_workers, take_all

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def settings(make_settings: Callable[..., Settings], gateway: RunningAlipayGateway, tmp_path: Path) -> Settings:
    return make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/secrecy.db",
                         token_keys=Fernet.generate_key().decode(), retry_delays="100ms",
                         ams_gateway_url=gateway.url, aps_gateway_url=gateway.url)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[SqlStore]:
    opened = await SqlStore.connect(settings.store_url(), settings.token_keys)
    yield opened
    await opened.close()


async def test_no_token_in_logs_events_dead_letters_metrics_cli_or_api_answers(
        settings: Settings, store: SqlStore, gateway: RunningAlipayGateway, channel: aio_pika.abc.AbstractChannel,
        json_logs: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    topology = build_topology(settings)
    secrets: list[str] = []
    code = f"2810CODE{uuid.uuid4().hex}"
    created = f"AT{uuid.uuid4().hex}"
    secrets += [code, created, f"refresh-{created}", *gateway.gateway.tokens_for("aps", code)]
    broker = Broker(settings.broker_url(), topology, connection_name="test-secrecy")
    publisher = ConfirmedPublisher(broker, name="test", confirm_timeout=5.0)
    await publisher.wait_ready(20)
    made = new_api_key("scanner", ["authorizations:read", "tokens:read", "authorizations:revoke"])
    client = TestClient(TestServer(create_api_app(store, publisher, topology, parse_api_keys(made.toml_entry()))))
    await client.start_server()
    answers: list[str] = []
    issued: list[str] = []
    auth = {"Authorization": f"Bearer {made.key}"}
    try:
        async with running_workers(settings, *[c.value for c in Consumer if c is not Consumer.MERCHANT_EVENTS]):
            ok_before = metric("authnotify_messages_processed_total", queue="authcode-created", outcome="ok")
            await publish_notification(channel, settings, "aps", {
                "authorizationNotifyType": "AUTHCODE_CREATED", "authClientId": "218823863726123456789",
                "referenceMerchantId": "218823863726123456780", "authCode": code, "authState": "s",
                "referenceAgreementId": "agr-secrecy", "acquirerId": "1", "pspId": "2"})
            await publish_notification(channel, settings, "aps", aps_token_created(created, accessTokenExpiryTime=(
                NOW + timedelta(hours=1)).isoformat(), refreshTokenExpiryTime=(NOW + timedelta(days=3)).isoformat()))

            async def both_stored() -> bool:
                return len(await store.list_authorizations()) == 2 and metric(
                    "authnotify_messages_processed_total", queue="authcode-created", outcome="ok") > ok_before

            await eventually(both_stored, what="both authorizations stored")
            scheduler = Scheduler(store, publisher, topology, schedule_of(settings, topology))
            await scheduler.run_pass()  # the TOKEN_CREATED one is due: refresh request and warning

            async def refreshed() -> bool:
                return bool(gateway.gateway.refresh_calls)

            await eventually(refreshed, what="the refresh")
            secrets += [*gateway.gateway.refreshed_tokens_for("aps", f"refresh-{created}")]
            exchanged = await store.get_authorization(access_token_fingerprint(secrets[3]))
            assert exchanged is not None
            # A refresh answered F (its event carries the reason), a revocation refused (a dead letter).
            gateway.gateway.script(Outcome.failure("INVALID_REFRESH_TOKEN"), operation="refresh")
            current = await store.current_tokens(exchanged.authorizationId or "")
            assert current is not None
            from authnotify.domain.commands import RefreshRequest
            from authnotify.messaging.sending import send_command

            await send_command(publisher, topology, RefreshRequest(
                authorizationId=current.authorization.authorizationId or "", provider="aps",
                accessTokenFingerprint=current.authorization.accessTokenFingerprint))

            async def expired() -> bool:
                found = await store.get_authorization(exchanged.authorizationId or "")
                return found is not None and found.status == "expired"

            await eventually(expired, what="the expiry")
            others = [a for a in await store.list_authorizations() if a.status == "active"]
            [other] = others
            for path in (f"/v1/authorizations/{other.authorizationId}", "/v1/authorizations",
                         "/v1/authorizations?expiringWithin=7d&status=active", "/v1/openapi.json",
                         "/v1/authorizations/nope", f"/v1/authorizations/{exchanged.authorizationId}"):
                response = await client.get(path, headers=auth)
                answers.append(await response.text())
            token_answer = await client.post(f"/v1/authorizations/{other.authorizationId}/access-token", headers=auth)
            issued.append((await token_answer.json())["accessToken"])
            refused = await client.post(f"/v1/authorizations/{exchanged.authorizationId}/access-token", headers=auth)
            answers.append(await refused.text())
            gateway.gateway.script(Outcome.failure("PROCESS_FAIL"), operation="revoke", times=1)
            revoked = await client.post(f"/v1/authorizations/{other.authorizationId}/revoke", json={"reason": "r"},
                                        headers=auth)
            answers.append(await revoked.text())

            async def dead_lettered() -> bool:
                from tests.events_harness import queue_depth

                return await queue_depth(channel, topology.dead_letter_queue(Consumer.REVOCATIONS)) == 1

            await eventually(dead_lettered, what="the refused revocation")
        events = [message.body.decode() for message in await take_all(
            channel, topology.consumer_queue(Consumer.MERCHANT_EVENTS))]
        dead = [(message.body.decode(), str(message.headers)) for message in await take_all(
            channel, topology.dead_letter_queue(Consumer.REVOCATIONS))]
    finally:
        await client.close()
        await publisher.close()
        await broker.close()

    assert {orjson.loads(e)["type"] for e in events} >= {"authorization.activated", "authorization.refreshed",
                                                         "authorization.expiring", "authorization.expired"}
    assert issued and issued[0] in secrets  # the one answer made to carry a token carries it
    monkeypatch.setenv("AUTHNOTIFY_DATABASE_URL", settings.store_url())
    logs = capsys.readouterr().err  # before the commands: they reconfigure logging
    cli: list[str] = []
    for args in (["authorizations", "list", "--json"], ["authorizations", "list"],
                 ["authorizations", "show", other.authorizationId or ""]):
        assert await asyncio.to_thread(main, args) == 0  # the command runs its own event loop
        out, err = capsys.readouterr()
        cli.append(out + err)
    metrics = render_metrics()[0].decode()
    scanned = {"logs": logs, "events": "\n".join(events), "dead letters": repr(dead), "metrics": metrics,
               "cli": "\n".join(cli), "api answers": "\n".join(answers)}
    for where, text in scanned.items():
        assert text, where
        for secret in secrets:
            assert secret not in text, f"a token or code in the {where}"
    assert made.key not in logs
