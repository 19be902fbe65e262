"""The worker runtime against the real broker: handler outcomes become acks, retries and dead letters."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY

from authnotify.alipay.notifications import InvalidNotification, parse_notification
from authnotify.config import Settings
from authnotify.domain.authorizations import AuthorizationData
from authnotify.domain.events import MerchantEvent
from authnotify.errors import PermanentError, TransientError
from authnotify.messaging import headers as h
from authnotify.messaging.consumer import ConsumerSpec, MessageContext
from authnotify.messaging.topology import Consumer, build_topology, declare_topology, event_routing_key
from authnotify.workers.process import Workers

FAST_RETRIES = "200ms,400ms"
WAIT_SECONDS = 15.0
ACCESS_TOKEN = "281UT3C0aYAhE2bK2iVqfyXpZ5f0Rza5mA0P5ytj4iu1XUZT9e2"


def token_created_body(access_token: str = ACCESS_TOKEN) -> bytes:
    return orjson.dumps({
        "authorizationNotifyType": "TOKEN_CREATED",
        "accessToken": access_token,
        "authClientId": "2188120123456789",
        "result": {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"},
    })


def sample_event(provider: str = "ams") -> MerchantEvent:
    data = AuthorizationData(provider=provider, status="active", accessTokenFingerprint="3f1c0123456789ab")  # type: ignore[arg-type]
    return MerchantEvent.of("authorization.activated", data, datetime(2026, 1, 2, 3, 4, 5))


def processed(consumer: Consumer, outcome: str) -> float:
    return REGISTRY.get_sample_value(
        "authnotify_messages_processed_total", {"queue": consumer.value, "outcome": outcome}
    ) or 0.0


async def wait_for(predicate: Callable[[], bool], timeout: float = WAIT_SECONDS, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def publish_notification(connection: aio_pika.abc.AbstractConnection, settings: Settings, body: bytes,
                               *, provider: str = "ams", notify_type: str = "TOKEN_CREATED",
                               message_id: str | None = None) -> str:
    message_id = message_id or uuid.uuid4().hex
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(build_topology(settings).notifications_exchange, ensure=False)
    await exchange.publish(
        aio_pika.Message(
            body=body, message_id=message_id, content_type=h.JSON_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={h.PROVIDER: provider, h.NOTIFY_TYPE: notify_type, h.RECEIVED_AT: h.utc_now_iso(), h.ATTEMPT: 1},
        ),
        routing_key=f"{provider}.{notify_type}",
    )
    await channel.close()
    return message_id


async def take(connection: aio_pika.abc.AbstractConnection, queue_name: str, count: int = 1,
               timeout: float = WAIT_SECONDS) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Consumes ``count`` messages from a queue (acked), polling until they are there."""
    channel = await connection.channel()
    queue = await channel.get_queue(queue_name, ensure=False)
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(taken) < count:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            taken.append(message)
            continue
        if time.monotonic() > deadline:
            raise AssertionError(f"{queue_name}: got {len(taken)} of {count} messages")
        await asyncio.sleep(0.02)
    await channel.close()
    return taken


async def queue_depth(connection: aio_pika.abc.AbstractConnection, queue_name: str) -> int:
    channel = await connection.channel()
    queue = await channel.declare_queue(queue_name, passive=True)
    count = queue.declaration_result.message_count
    await channel.close()
    return count


class Recorder:
    """A test handler: records each call's context, then does what the test scripted."""

    def __init__(self, behaviour: Callable[[MessageContext], Awaitable[Sequence[MerchantEvent] | None]]) -> None:
        self.contexts: list[MessageContext] = []
        self.times: list[float] = []
        self.behaviour = behaviour

    async def handle(self, parsed: Any, context: MessageContext) -> Sequence[MerchantEvent] | None:
        self.contexts.append(context)
        self.times.append(time.monotonic())
        return await self.behaviour(context)


def raw_parse(body: bytes, _context: MessageContext) -> bytes:
    return body


def notification_parse(body: bytes, context: MessageContext) -> Any:
    try:
        return parse_notification(body, context.provider, "TOKEN_CREATED")
    except InvalidNotification as exc:
        raise PermanentError(str(exc)) from None


@pytest.fixture
async def run_runtime() -> AsyncIterator[Callable[..., Awaitable[Workers]]]:
    started: list[Workers] = []

    async def start(settings: Settings, specs: Sequence[ConsumerSpec], **kwargs: Any) -> Workers:
        runtime = Workers(settings, specs, **kwargs)
        await runtime.start()
        started.append(runtime)
        await runtime.wait_ready(WAIT_SECONDS)
        return runtime

    yield start
    for runtime in started:
        await runtime.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- outcomes ----------------------------------------------------------------------------------


async def test_success_publishes_returned_events_then_acks(make_settings, amqp_connection, run_runtime) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    topology = build_topology(settings)
    event = sample_event()

    async def succeed(_context: MessageContext) -> list[MerchantEvent]:
        return [event]

    recorder = Recorder(succeed)
    before = processed(Consumer.TOKEN_CREATED, "ok")
    await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, notification_parse, recorder.handle)])
    message_id = await publish_notification(amqp_connection, settings, token_created_body())

    [delivered] = await take(amqp_connection, topology.consumer_queue(Consumer.MERCHANT_EVENTS))
    assert delivered.body == event.to_json()
    assert delivered.message_id == event.id
    assert delivered.routing_key == event_routing_key("authorization.activated")
    assert delivered.headers[h.PROVIDER] == "ams"
    assert delivered.headers[h.NOTIFY_TYPE] == "authorization.activated"
    assert delivered.headers[h.ATTEMPT] == 1
    await wait_for(lambda: processed(Consumer.TOKEN_CREATED, "ok") == before + 1, what="ok metric")
    [context] = recorder.contexts
    assert context == MessageContext(Consumer.TOKEN_CREATED, message_id, "ams", "TOKEN_CREATED", 1, False)
    assert await queue_depth(amqp_connection, topology.consumer_queue(Consumer.TOKEN_CREATED)) == 0
    assert await queue_depth(amqp_connection, topology.dead_letter_queue(Consumer.TOKEN_CREATED)) == 0


async def test_message_is_not_acked_when_its_events_cannot_be_published(
    make_settings, amqp_connection, run_runtime
) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    topology = build_topology(settings)
    event = sample_event()
    calls = asyncio.Event()
    restored = asyncio.Event()

    async def succeed(context: MessageContext) -> list[MerchantEvent]:
        if len(recorder.contexts) >= 2:
            calls.set()
            await restored.wait()  # publish again only once the exchange and its bindings are back
        return [event]

    recorder = Recorder(succeed)
    await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, recorder.handle)])
    channel = await amqp_connection.channel()
    # Without the exchange the event publish fails (404): the notification must come back, not be acked.
    await channel.exchange_delete(topology.notifications_exchange, if_unused=False)
    await channel.default_exchange.publish(
        aio_pika.Message(b"{}", message_id="m-1", headers={h.PROVIDER: "ams", h.ATTEMPT: 1}),
        routing_key=topology.consumer_queue(Consumer.TOKEN_CREATED),
    )
    await asyncio.wait_for(calls.wait(), WAIT_SECONDS)
    assert recorder.contexts[0].possibly_seen_before is False
    assert recorder.contexts[-1].possibly_seen_before is True  # a broker redelivery
    await declare_topology(channel, topology)
    restored.set()
    [delivered] = await take(amqp_connection, topology.consumer_queue(Consumer.MERCHANT_EVENTS))
    assert delivered.message_id == event.id
    assert await queue_depth(amqp_connection, topology.dead_letter_queue(Consumer.TOKEN_CREATED)) == 0


async def test_permanent_error_dead_letters_at_once_with_body_unchanged(
    make_settings, amqp_connection, run_runtime
) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    topology = build_topology(settings)

    async def refuse(_context: MessageContext) -> None:
        raise PermanentError("applyToken answered F: INVALID_CODE")

    recorder = Recorder(refuse)
    before = processed(Consumer.TOKEN_CREATED, "dead-lettered")
    await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, recorder.handle)])
    body = token_created_body()
    message_id = await publish_notification(amqp_connection, settings, body)

    [dead] = await take(amqp_connection, topology.dead_letter_queue(Consumer.TOKEN_CREATED))
    assert dead.body == body
    assert dead.message_id == message_id
    assert dead.headers[h.DEAD_REASON] == "applyToken answered F: INVALID_CODE"
    assert dead.headers[h.DEAD_ATTEMPTS] == 1
    assert dead.headers[h.DEAD_QUEUE] == "token-created"
    assert datetime.fromisoformat(str(dead.headers[h.DEAD_AT]).replace("Z", "+00:00")).tzinfo is not None
    assert dead.headers[h.PROVIDER] == "ams"  # original headers kept
    assert dead.headers[h.RECEIVED_AT]
    assert len(recorder.contexts) == 1
    await wait_for(lambda: processed(Consumer.TOKEN_CREATED, "dead-lettered") == before + 1, what="metric")
    assert await queue_depth(amqp_connection, topology.consumer_queue(Consumer.TOKEN_CREATED)) == 0


async def test_parse_error_is_permanent_and_reason_names_the_rule(
    make_settings, amqp_connection, run_runtime
) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    topology = build_topology(settings)

    async def never(_context: MessageContext) -> None:
        raise AssertionError("handle must not run for a bad body")

    recorder = Recorder(never)
    await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, notification_parse, recorder.handle)])
    too_long = "T" * 129  # AMS accessToken is at most 128 characters
    body = token_created_body(too_long)
    await publish_notification(amqp_connection, settings, body)

    [dead] = await take(amqp_connection, topology.dead_letter_queue(Consumer.TOKEN_CREATED))
    assert dead.body == body
    assert dead.headers[h.DEAD_ATTEMPTS] == 1
    reason = str(dead.headers[h.DEAD_REASON])
    assert "accessToken" in reason
    assert "TTTTTTTT" not in reason
    assert recorder.contexts == []


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_transient_error_is_retried_after_each_delay_then_dead_lettered(
    make_settings, amqp_connection, run_runtime, queue_type: str
) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES, queue_type=queue_type)
    topology = build_topology(settings)

    async def fail(context: MessageContext) -> None:
        raise TransientError(f"gateway timed out (attempt {context.attempt})")

    recorder = Recorder(fail)
    retried_before = processed(Consumer.TOKEN_CREATED, "retried")
    await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, recorder.handle)])
    body = token_created_body()
    message_id = await publish_notification(amqp_connection, settings, body)

    [dead] = await take(amqp_connection, topology.dead_letter_queue(Consumer.TOKEN_CREATED))
    assert dead.body == body and dead.message_id == message_id
    assert dead.headers[h.DEAD_ATTEMPTS] == 3
    assert dead.headers[h.DEAD_REASON] == "gateway timed out (attempt 3)"
    assert dead.headers[h.LAST_ERROR] == "gateway timed out (attempt 2)"
    assert [c.attempt for c in recorder.contexts] == [1, 2, 3]
    assert [c.possibly_seen_before for c in recorder.contexts] == [False, True, True]
    assert {c.message_id for c in recorder.contexts} == {message_id}
    # Each retry waited in its delay queue: 200 ms, then 400 ms.
    assert recorder.times[1] - recorder.times[0] >= 0.18
    assert recorder.times[2] - recorder.times[1] >= 0.38
    assert processed(Consumer.TOKEN_CREATED, "retried") == retried_before + 2
    for step in topology.retry_steps(Consumer.TOKEN_CREATED):
        assert await queue_depth(amqp_connection, step.queue) == 0


async def test_unexpected_exception_counts_as_transient_and_never_leaks_a_token(
    make_settings, amqp_connection, run_runtime
) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    topology = build_topology(settings)

    async def crash(_context: MessageContext) -> None:
        raise ValueError(f"could not store token {ACCESS_TOKEN}\nsecond line")

    recorder = Recorder(crash)
    await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, recorder.handle)])
    await publish_notification(amqp_connection, settings, token_created_body())

    [dead] = await take(amqp_connection, topology.dead_letter_queue(Consumer.TOKEN_CREATED))
    assert [c.attempt for c in recorder.contexts] == [1, 2, 3]
    assert dead.headers[h.DEAD_REASON] == "ValueError: could not store token [redacted]"
    assert ACCESS_TOKEN not in str(dead.headers)


async def test_success_on_a_retry_acks_without_dead_lettering(make_settings, amqp_connection, run_runtime) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    topology = build_topology(settings)
    done = asyncio.Event()

    async def flaky(context: MessageContext) -> None:
        if context.attempt == 1:
            raise OSError("connection reset")
        done.set()

    recorder = Recorder(flaky)
    await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, recorder.handle)])
    await publish_notification(amqp_connection, settings, token_created_body())
    await asyncio.wait_for(done.wait(), WAIT_SECONDS)
    assert [c.attempt for c in recorder.contexts] == [1, 2]
    await wait_for(lambda: processed(Consumer.TOKEN_CREATED, "ok") >= 1, what="ok")
    assert await queue_depth(amqp_connection, topology.dead_letter_queue(Consumer.TOKEN_CREATED)) == 0


async def test_replayed_message_is_possibly_seen_before(make_settings, amqp_connection, run_runtime) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    topology = build_topology(settings)
    done = asyncio.Event()

    async def ok(_context: MessageContext) -> None:
        done.set()

    recorder = Recorder(ok)
    await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, recorder.handle)])
    channel = await amqp_connection.channel()
    await channel.default_exchange.publish(
        aio_pika.Message(b"{}", message_id="r-1", headers={h.ATTEMPT: 1, h.REPLAYED: 1}),
        routing_key=topology.consumer_queue(Consumer.TOKEN_CREATED),
    )
    await asyncio.wait_for(done.wait(), WAIT_SECONDS)
    [context] = recorder.contexts
    assert context.attempt == 1 and context.possibly_seen_before is True
    assert context.provider is None  # no header and no routing key word to fall back on


# --- lifecycle ------------------------------------------------------------------------------------


async def test_stop_lets_held_messages_finish_before_closing(make_settings, amqp_connection) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    topology = build_topology(settings)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(_context: MessageContext) -> list[MerchantEvent]:
        entered.set()
        await release.wait()  # e.g. a merchant delivery under way
        return [sample_event()]

    recorder = Recorder(slow)
    runtime = Workers(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, recorder.handle)])
    await runtime.start()
    await runtime.wait_ready(WAIT_SECONDS)
    await publish_notification(amqp_connection, settings, token_created_body())
    await asyncio.wait_for(entered.wait(), WAIT_SECONDS)

    stopping = asyncio.create_task(runtime.stop())
    await wait_for(lambda: not runtime.ready, what="not ready while stopping")
    await publish_notification(amqp_connection, settings, token_created_body())  # must not be taken now
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, WAIT_SECONDS)

    assert len(recorder.contexts) == 1
    [event] = await take(amqp_connection, topology.consumer_queue(Consumer.MERCHANT_EVENTS))
    assert event.message_id == sample_event().id
    # The held message was acked; the one sent during the stop waits for the next worker.
    assert await queue_depth(amqp_connection, topology.consumer_queue(Consumer.TOKEN_CREATED)) == 1


async def test_health_endpoints(make_settings, amqp_connection, run_runtime) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    port = free_port()

    async def ok(_context: MessageContext) -> None:
        return None

    runtime = await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, Recorder(ok).handle)],
                                http_port=port)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
        async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
            assert response.status == 200
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        assert "authnotify_messages_processed_total" in text
        assert "authnotify_message_handling_seconds" in text
        assert "authnotify_broker_connected 1.0" in text
    await runtime.stop()
    assert not runtime.ready


async def test_not_ready_while_the_broker_is_unreachable(make_settings) -> None:
    settings = make_settings(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/")
    port = free_port()

    async def ok(_context: MessageContext) -> None:
        return None

    runtime = Workers(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, Recorder(ok).handle)],
                            http_port=port)
    await runtime.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert response.status == 503
    finally:
        await runtime.stop()


async def test_consumers_run_concurrently_up_to_the_prefetch(make_settings, amqp_connection, run_runtime) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    release = asyncio.Event()
    active = 0
    peak = 0

    async def hold(_context: MessageContext) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await release.wait()
        active -= 1

    recorder = Recorder(hold)
    await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, recorder.handle, prefetch=3)])
    for _ in range(5):
        await publish_notification(amqp_connection, settings, token_created_body())
    await wait_for(lambda: peak == 3, what="three held at once")
    release.set()
    await wait_for(lambda: len(recorder.contexts) == 5, what="all five handled")
    assert peak == 3


# --- broker restart ------------------------------------------------------------------------------


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.broker_restart
async def test_worker_survives_a_broker_restart(make_settings, rabbitmq_url, run_runtime) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    handled: list[str] = []

    async def ok(context: MessageContext) -> None:
        handled.append(context.message_id)

    runtime = await run_runtime(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, raw_parse, Recorder(ok).handle)])
    connection = await aio_pika.connect(rabbitmq_url)
    first = await publish_notification(connection, settings, token_created_body())
    await wait_for(lambda: first in handled, what="first message")
    await connection.close()

    try:
        rabbitmqctl("stop_app")
        await wait_for(lambda: not runtime.ready, what="worker notices the broker is gone")
    finally:
        rabbitmqctl("start_app")
    await wait_for(lambda: runtime.ready, timeout=60, what="worker ready again")

    connection = await aio_pika.connect(rabbitmq_url)
    try:
        second = await publish_notification(connection, settings, token_created_body())
        await wait_for(lambda: second in handled, timeout=30, what="message after the restart")
    finally:
        await connection.close()


# --- the worker command ---------------------------------------------------------------------------


async def test_worker_command_serves_health_and_exits_0_on_sigterm(make_settings, tmp_path) -> None:
    import os
    import signal
    import sys

    from cryptography.fernet import Fernet

    settings = make_settings(retry_delays=FAST_RETRIES)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env.update({
        "AUTHNOTIFY_RABBITMQ_URL": settings.broker_url(),
        "AUTHNOTIFY_NAMESPACE": settings.namespace,
        "AUTHNOTIFY_RETRY_DELAYS": FAST_RETRIES,
        "AUTHNOTIFY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/worker.db",
        "AUTHNOTIFY_TOKEN_KEYS": Fernet.generate_key().decode(),
        "AUTHNOTIFY_WORKER_HTTP_PORT": str(port),
        "AUTHNOTIFY_HTTP_HOST": "127.0.0.1",
    })
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "worker", "token-canceled", "token-created",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )
    try:
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            deadline = time.monotonic() + 60
            while not await ready():
                assert process.returncode is None, (await process.stderr.read()).decode()[-2000:]
                assert time.monotonic() < deadline, "worker never became ready"
                await asyncio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _stdout, stderr = await asyncio.wait_for(process.communicate(), 40)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert b"Traceback" not in stderr
    assert b"worker_stopped" in stderr
