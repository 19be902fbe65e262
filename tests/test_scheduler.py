"""The scheduler: what a pass publishes and records, what it does when the publish or the database fails,
the broker and the database going away and coming back under a running scheduler, and two schedulers with
two refresh workers racing, as real processes on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from authnotify.config import Settings
from authnotify.devtools.sandbox.alipay_gateway import RunningAlipayGateway
from authnotify.domain.authorizations import TokenGrant
from authnotify.domain.commands import RefreshRequest
from authnotify.domain.events import MerchantEvent
from authnotify.messaging.connection import Broker
from authnotify.messaging.memory import InMemoryPublisher
from authnotify.messaging.publisher import ConfirmedPublisher
from authnotify.messaging.topology import Consumer, build_topology, command_routing_key, event_routing_key
from authnotify.scheduler.process import Scheduler, SchedulerLoop, schedule_of
from authnotify.store import SqlStore
from authnotify.store.memory import InMemoryStore
from tests.conftest import fresh_database
from tests.events_harness import eventually, metric, queue_depth

NOW = datetime.now(UTC).replace(microsecond=0)


def due_grant(**fields: Any) -> TokenGrant:
    values: dict[str, Any] = {"provider": "aps", "access_token": f"AT{uuid.uuid4().hex}",
                              "refresh_token": f"RT{uuid.uuid4().hex}", "access_token_expiry_time": NOW + timedelta(hours=3),
                              "refresh_token_expiry_time": NOW + timedelta(days=5), "auth_client_id": "C-1"}
    values.update(fields)
    return TokenGrant(**values)


# --- a pass, on the in-memory twins ----------------------------------------------------------------------


async def test_a_pass_publishes_requests_and_warnings_once_and_a_failed_publish_is_due_again(
        offline_settings: Callable[..., Settings]) -> None:
    settings = offline_settings()
    topology = build_topology(settings)
    store, publisher = InMemoryStore(), InMemoryPublisher()
    transition = await store.record_tokens(due_grant())
    scheduler = Scheduler(store, publisher, topology, schedule_of(settings, topology), batch_size=1)

    publisher.failure = "broker unavailable"
    failed = await scheduler.run_pass()
    assert (failed.claimed, failed.failed, failed.refresh_requests) == (1, 2, 0)
    assert failed.lag_seconds > 0  # the work is due and not published
    assert metric("authnotify_scheduler_lag_seconds") > 0

    publisher.failure = None
    done = await scheduler.run_pass()
    assert (done.refresh_requests, done.warnings, done.failed) == (1, 1, 0) and done.lag_seconds == 0
    [request] = publisher.to(command_routing_key(Consumer.TOKEN_REFRESH))
    parsed = RefreshRequest.model_validate_json(request.body)
    assert parsed.authorizationId == transition.authorization.authorizationId and parsed.origin == "scheduler"
    [warning] = publisher.to(event_routing_key("authorization.expiring"))
    assert MerchantEvent.model_validate_json(warning.body).data.authorizationId == parsed.authorizationId
    assert (await scheduler.run_pass()).claimed == 0  # pending and warned: nothing more
    assert metric("authnotify_authorizations", status="active") == 1
    assert metric("authnotify_tokens_expiring", token="refresh", within="7d") == 1


async def test_a_database_outage_fails_the_pass_not_the_scheduler(offline_settings: Callable[..., Settings]) -> None:
    settings = offline_settings()
    topology = build_topology(settings)
    store, publisher = InMemoryStore(), InMemoryPublisher()
    await store.record_tokens(due_grant())
    scheduler = Scheduler(store, publisher, topology, schedule_of(settings, topology))
    store.failure = "database unreachable"
    assert (await scheduler.run_pass()).claimed == 0 and not scheduler.database_ok
    store.failure = None
    assert (await scheduler.run_pass()).refresh_requests == 1 and scheduler.database_ok


def test_a_refresh_request_stays_pending_for_the_token_refresh_retries_alone(
        offline_settings: Callable[..., Settings]) -> None:
    """The pending window follows AUTHNOTIFY_RETRY_DELAYS_TOKEN_REFRESH, not another consumer's schedule."""
    settings = offline_settings(retry_delays="1s", retry_delays_token_refresh="1m,10m",
                                retry_delays_merchant_events="10h")
    pending = schedule_of(settings, build_topology(settings)).pending
    assert pending == timedelta(minutes=11) + timedelta(seconds=600)  # the retries, then the margin


# --- the broker and the database going away under a running scheduler --------------------------------------


class Proxy:
    """A TCP proxy to a real service that can be cut and restored: the service "goes away" for its clients."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for writer in list(self.links):
            writer.close()
        self.links.clear()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.links |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@pytest.fixture
async def postgres_database(request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str) -> AsyncIterator[str]:
    async with fresh_database("postgresql", request, tmp_path) as url:
        yield url


@pytest.mark.slow
async def test_the_scheduler_survives_the_broker_and_the_database_going_away_and_coming_back(
        make_settings: Callable[..., Settings], postgres_database: str, rabbitmq_url: str,
        amqp_connection: Any) -> None:
    broker_url, database_url = make_url(rabbitmq_url), make_url(postgres_database)
    broker_proxy = Proxy(broker_url.host or "127.0.0.1", broker_url.port or 5672)
    database_proxy = Proxy(database_url.host or "127.0.0.1", database_url.port or 5432)
    await broker_proxy.start()
    await database_proxy.start()
    settings = make_settings(
        rabbitmq_url=broker_url.set(port=broker_proxy.port).render_as_string(hide_password=False),
        database_url=database_url.set(port=database_proxy.port).render_as_string(hide_password=False),
        token_keys=Fernet.generate_key().decode())
    topology = build_topology(settings)
    direct = await SqlStore.connect(postgres_database, settings.token_keys)
    broker = Broker(settings.broker_url(), topology, connection_name="test-scheduler-outage")
    publisher = ConfirmedPublisher(broker, name="scheduler", confirm_timeout=3.0)
    publisher.start()
    loop = SchedulerLoop(settings, publisher, topology, interval=0.2)
    channel = await amqp_connection.channel()
    refresh_queue = topology.consumer_queue(Consumer.TOKEN_REFRESH)
    try:
        await publisher.wait_ready(20)
        loop.start()
        await direct.record_tokens(due_grant())
        await eventually(lambda: _depth(channel, refresh_queue, 1), timeout=20, what="the first request")

        await broker_proxy.cut()
        await database_proxy.cut()
        await direct.record_tokens(due_grant())  # due while both are away
        await eventually(_not(lambda: loop.ready), timeout=20, what="the scheduler noticing the outage")
        await asyncio.sleep(1.0)  # a few passes fail or are skipped meanwhile
        assert await queue_depth(channel, refresh_queue) == 1

        await broker_proxy.start()
        await database_proxy.start()
        await eventually(lambda: _depth(channel, refresh_queue, 2), timeout=30, what="the request after the outage")
        await eventually(_is(lambda: loop.ready), timeout=20, what="ready again")
    finally:
        await loop.stop()
        await publisher.close()
        await broker.close()
        await direct.close()
        await broker_proxy.cut()
        await database_proxy.cut()


def _not(check: Callable[[], bool]) -> Callable[[], Any]:
    async def inverted() -> bool:
        return not check()
    return inverted


def _is(check: Callable[[], bool]) -> Callable[[], Any]:
    async def plain() -> bool:
        return check()
    return plain


async def _depth(channel: Any, queue: str, count: int) -> bool:
    return await queue_depth(channel, queue) >= count


# --- two schedulers and two refresh workers, as processes on PostgreSQL --------------------------------------


def _env(settings: Settings, gateway: RunningAlipayGateway, token_key: str) -> dict[str, str]:
    from tests.conftest import AMS_CLIENT_ID, APS_CLIENT_ID

    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env.update(
        AUTHNOTIFY_RABBITMQ_URL=settings.broker_url(), AUTHNOTIFY_DATABASE_URL=settings.store_url(),
        AUTHNOTIFY_NAMESPACE=settings.namespace, AUTHNOTIFY_QUEUE_TYPE=settings.queue_type,
        AUTHNOTIFY_TOKEN_KEYS=token_key, AUTHNOTIFY_WORKER_HTTP_PORT="0", AUTHNOTIFY_RETRY_DELAYS="200ms,400ms",
        AUTHNOTIFY_SCHEDULER_INTERVAL="300ms", AUTHNOTIFY_LOG_FORMAT="json",
        AUTHNOTIFY_AMS_CLIENT_ID=AMS_CLIENT_ID, AUTHNOTIFY_APS_CLIENT_ID=APS_CLIENT_ID,
        AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO="ALIPAY_CN", AUTHNOTIFY_AMS_GATEWAY_URL=gateway.url,
        AUTHNOTIFY_APS_GATEWAY_URL=gateway.url,
    )
    for provider in ("ams", "aps"):
        config = settings.provider(provider)
        assert config is not None
        from authnotify.config.keys import private_key_pem, public_key_pem

        env[f"AUTHNOTIFY_{provider.upper()}_PRIVATE_KEY"] = private_key_pem(config.private_key)
        env[f"AUTHNOTIFY_{provider.upper()}_ALIPAY_PUBLIC_KEY"] = public_key_pem(
            config.alipay_public_keys.for_version("1"))  # type: ignore[arg-type]
    return env


@pytest.mark.slow
async def test_two_schedulers_and_two_refresh_workers_refresh_each_authorization_once(
        make_settings: Callable[..., Settings], postgres_database: str, gateway: RunningAlipayGateway,
        tmp_path: Path) -> None:
    token_key = Fernet.generate_key().decode()
    settings = make_settings(database_url=postgres_database, token_keys=token_key)
    store = await SqlStore.connect(postgres_database, settings.token_keys)
    refresh_tokens = []
    for index in range(40):
        grant = due_grant(provider="ams" if index % 2 else "aps")
        refresh_tokens.append(grant.refresh_token)
        await store.record_tokens(grant)
    env = _env(settings, gateway, token_key)
    commands = [("scheduler",), ("scheduler",), ("worker", "token-refresh"), ("worker", "token-refresh")]
    processes = [await asyncio.create_subprocess_exec(sys.executable, "-m", "authnotify", *command, cwd=tmp_path,
                                                      env=env, stdout=asyncio.subprocess.DEVNULL,
                                                      stderr=asyncio.subprocess.PIPE)
                 for command in commands]
    try:
        async def all_refreshed() -> bool:
            return sum(gateway.gateway.refresh_calls.values()) >= 40 and all(
                len(timeline.tokens) == 2 for timeline in [await store.timeline(a.authorizationId or "")
                                                           for a in await store.list_authorizations()]
                if timeline is not None)

        await eventually(all_refreshed, timeout=60, interval=0.3, what="40 refreshes")
        await asyncio.sleep(1.5)  # several more passes of both schedulers: nothing more may be asked
        assert all(gateway.gateway.refresh_calls[token] == 1 for token in refresh_tokens), gateway.gateway.refresh_calls
        assert sum(gateway.gateway.refresh_calls.values()) == 40
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*(asyncio.wait_for(p.communicate(), 30) for p in processes))
        await store.close()
    for process, (_, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err.decode()[-2000:]
        assert b"Traceback" not in err
