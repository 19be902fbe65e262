"""The lifecycle on the real broker and databases (SQLite and PostgreSQL), against the sandbox gateway: the
scheduler's requests and warnings, the token-refresh and revocations workers, ``authorizations revoke``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from cryptography.fernet import Fernet

from authnotify.config import Settings
from authnotify.devtools.sandbox.alipay_gateway import Outcome, RunningAlipayGateway
from authnotify.domain.authorizations import TokenGrant, access_token_fingerprint
from authnotify.domain.commands import RefreshRequest
from authnotify.messaging import headers as h
from authnotify.messaging.connection import Broker
from authnotify.messaging.messages import command_message
from authnotify.messaging.publisher import ConfirmedPublisher
from authnotify.messaging.topology import Consumer, build_topology, command_routing_key
from authnotify.scheduler.process import Scheduler, schedule_of
from authnotify.store import SqlStore
from tests.events_harness import events_of, eventually, metric, running_workers, take_all, take_messages

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def settings(make_settings: Callable[..., Settings], database_url: str, gateway: RunningAlipayGateway) -> Settings:
    return make_settings(database_url=database_url, token_keys=Fernet.generate_key().decode(),
                         retry_delays="200ms,400ms", ams_gateway_url=gateway.url, aps_gateway_url=gateway.url)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[SqlStore]:
    opened = await SqlStore.connect(settings.store_url(), settings.token_keys)
    yield opened
    await opened.close()


@pytest.fixture
async def publisher(settings: Settings) -> AsyncIterator[ConfirmedPublisher]:
    broker = Broker(settings.broker_url(), build_topology(settings), connection_name="test-lifecycle")
    confirmed = ConfirmedPublisher(broker, name="test", confirm_timeout=5.0)
    await confirmed.wait_ready(20)
    yield confirmed
    await confirmed.close()
    await broker.close()


async def activate(store: SqlStore, provider: str, **fields: Any) -> tuple[str, str, str]:
    access, refresh = f"AT{uuid.uuid4().hex}", f"RT{uuid.uuid4().hex}"
    values: dict[str, Any] = {"provider": provider, "access_token": access, "refresh_token": refresh,
                              "access_token_expiry_time": NOW + timedelta(hours=2),
                              "refresh_token_expiry_time": NOW + timedelta(days=100),
                              "auth_client_id": "218823863726123456789", "reference_merchant_id": "M-1"}
    values.update(fields)
    transition = await store.record_tokens(TokenGrant(**values))
    return transition.authorization.authorizationId or "", access, refresh


async def publish_request(channel: aio_pika.abc.AbstractChannel, settings: Settings, request: RefreshRequest,
                          **headers: Any) -> None:
    message = command_message(request, kind=Consumer.TOKEN_REFRESH.value)
    exchange = await channel.get_exchange(build_topology(settings).notifications_exchange)
    await exchange.publish(aio_pika.Message(message.body, message_id=message.message_id,
                                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                            headers={**message.headers, **headers}),
                           routing_key=command_routing_key(Consumer.TOKEN_REFRESH))


@pytest.mark.parametrize("provider", ["ams", "aps"])
async def test_the_scheduler_requests_a_refresh_the_worker_refreshes_and_the_merchant_is_warned_once(
        provider: str, settings: Settings, store: SqlStore, publisher: ConfirmedPublisher,
        channel: aio_pika.abc.AbstractChannel, gateway: RunningAlipayGateway) -> None:
    topology = build_topology(settings)
    events_queue = topology.consumer_queue(Consumer.MERCHANT_EVENTS)
    due_id, due_access, due_refresh = await activate(store, provider)  # access token expires in 2 h: due
    warned_id, _, _ = await activate(store, provider, access_token_expiry_time=NOW + timedelta(days=20),
                                     refresh_token_expiry_time=NOW + timedelta(days=3))
    scheduler = Scheduler(store, publisher, topology, schedule_of(settings, topology))

    async with running_workers(settings, "token-refresh"):
        result = await scheduler.run_pass()
        assert (result.refresh_requests, result.warnings, result.failed) == (1, 1, 0)
        messages = await take_messages(channel, events_queue, 2)
        again = await scheduler.run_pass()  # nothing new is due: no second request, no second warning
        assert (again.claimed, again.refresh_requests, again.warnings) == (0, 0, 0)
    by_type = {event.type: event for event in events_of(messages)}
    assert set(by_type) == {"authorization.refreshed", "authorization.expiring"}
    new_access, _ = gateway.gateway.refreshed_tokens_for(provider, due_refresh)
    assert by_type["authorization.refreshed"].data.authorizationId == due_id
    assert by_type["authorization.refreshed"].data.accessTokenFingerprint == access_token_fingerprint(new_access)
    assert by_type["authorization.expiring"].data.authorizationId == warned_id
    assert gateway.gateway.refresh_calls[due_refresh] == 1
    assert await take_all(channel, events_queue) == []
    for message in messages:
        assert due_access not in message.body.decode() and new_access not in message.body.decode()
    timeline = await store.timeline(due_id)
    assert timeline is not None and len(timeline.tokens) == 2


async def test_a_refresh_answered_f_expires_once_however_often_the_request_comes(
        settings: Settings, store: SqlStore, channel: aio_pika.abc.AbstractChannel,
        gateway: RunningAlipayGateway) -> None:
    topology = build_topology(settings)
    authorization_id, access, _ = await activate(store, "aps")
    gateway.gateway.script(Outcome.failure("INVALID_REFRESH_TOKEN"), operation="refresh")
    request = RefreshRequest(authorizationId=authorization_id, provider="aps",
                             accessTokenFingerprint=access_token_fingerprint(access))
    before = metric("authnotify_messages_processed_total", queue="token-refresh", outcome="ok")
    async with running_workers(settings, "token-refresh"):
        await publish_request(channel, settings, request)
        await eventually(lambda: _processed(before, 1), what="the first request")
        await publish_request(channel, settings, request)  # the scheduler's duplicate
        await publish_request(channel, settings, request, **{h.REPLAYED: 1})  # an operator's replay
        await eventually(lambda: _processed(before, 3), what="three requests")
        events = events_of(await take_all(channel, topology.consumer_queue(Consumer.MERCHANT_EVENTS)))
    assert {event.type for event in events} == {"authorization.expired"}
    assert len({event.id for event in events}) == 1  # one event, whatever the redeliveries
    assert len(gateway.gateway.requests) == 1
    found = await store.get_authorization(authorization_id)
    assert found is not None and found.status == "expired"


async def _processed(before: float, count: int) -> bool:
    return metric("authnotify_messages_processed_total", queue="token-refresh", outcome="ok") - before >= count


async def _cli(settings: Settings, cwd: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env.update(AUTHNOTIFY_DATABASE_URL=settings.store_url(), AUTHNOTIFY_RABBITMQ_URL=settings.broker_url(),
               AUTHNOTIFY_NAMESPACE=settings.namespace, AUTHNOTIFY_QUEUE_TYPE=settings.queue_type,
               AUTHNOTIFY_RETRY_DELAYS="200ms,400ms")
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "authnotify", *args, cwd=cwd, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_authorizations_revoke_waits_for_the_outcome_and_fails_in_one_line(
        settings: Settings, store: SqlStore, channel: aio_pika.abc.AbstractChannel, gateway: RunningAlipayGateway,
        tmp_path: Path) -> None:
    topology = build_topology(settings)
    revoked_id, access, _ = await activate(store, "ams")
    refused_id, refused_access, _ = await activate(store, "aps")
    async with running_workers(settings, "revocations"):
        code, out, err = await _cli(settings, tmp_path, "authorizations", "revoke", access_token_fingerprint(access),
                                    "--reason", "closed the account", "--wait", "--json")
        assert code == 0, err
        answer = json.loads(out)
        assert answer["authorizationId"] == revoked_id and answer["status"] == "succeeded"
        assert answer["commandId"].startswith("cmd_")
        [event] = events_of(await take_messages(channel, topology.consumer_queue(Consumer.MERCHANT_EVENTS), 1))
        assert event.type == "authorization.canceled" and event.data.tokenCancelSource == "MERCHANT"
        assert event.data.reason == "closed the account"

        # Again: a successful no-op.
        code, out, err = await _cli(settings, tmp_path, "authorizations", "revoke", revoked_id, "--wait")
        assert code == 0, err

        gateway.gateway.script(Outcome.failure("PROCESS_FAIL"), operation="revoke")
        code, out, err = await _cli(settings, tmp_path, "authorizations", "revoke", refused_id, "--wait")
        assert code == 1 and out == ""
        assert len(err.strip().splitlines()) == 1 and "PROCESS_FAIL" in err
        [dead] = await take_messages(channel, topology.dead_letter_queue(Consumer.REVOCATIONS), 1)
        assert "PROCESS_FAIL" in str(dead.headers.get(h.DEAD_REASON))

        code, out, err = await _cli(settings, tmp_path, "authorizations", "revoke", "no-such-key")
        assert code == 1 and len(err.strip().splitlines()) == 1 and "no authorization matches" in err and "no-such-key" not in err
    for secret in (access, refused_access):
        assert secret not in out + err
