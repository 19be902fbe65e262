"""The consumer runtime: the one place that maps a handler's outcome to AMQP (contract sections 5, 7, 8).

A handler parses and handles; it returns merchant events or raises. The runtime then:

* success: publishes the returned events (confirmed), then acks;
* :class:`PermanentError`: publishes the message, unchanged, to ``{ns}.{consumer}.dead`` (confirmed), then acks;
* :class:`TransientError` or any other exception: publishes it to the retry queue of this attempt with
  ATTEMPT+1 (confirmed), then acks; after the last attempt it is dead-lettered with the last reason.

Nothing is acked before its follow-up publishes are confirmed. When a follow-up publish fails (broker
trouble), the message is not acked: it is requeued if the channel still works, and otherwise redelivered by
the broker once the connection is back. So every step is at-least-once; handlers are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from aiohttp import web

from authnotify.messaging import headers as h
from authnotify.messaging.connection import Broker
from authnotify.config.settings import PROVIDERS, Settings
from authnotify.domain.events import MerchantEvent
from authnotify.observability.logging import get_logger, is_secret_field
from authnotify.observability.metrics import BROKER_CONNECTED, MESSAGE_HANDLING_SECONDS, MESSAGES_PROCESSED, render_metrics
from authnotify.messaging.topology import Consumer, Topology, build_topology, event_routing_key

log = get_logger("authnotify.worker")

DRAIN_TIMEOUT_SECONDS = 30.0
PUBLISH_TIMEOUT_SECONDS = 10.0
REASON_MAX_LENGTH = 300


class PermanentError(Exception):
    """Dead-letter now; ``str(exc)`` is the reason."""


class TransientError(Exception):
    """Retry after the next delay, dead-letter after the last; ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class MessageContext:
    consumer: Consumer
    message_id: str
    provider: str | None  # from the PROVIDER header (fallback: first word of the routing key)
    notify_type: str | None
    attempt: int  # 1 on first delivery
    possibly_seen_before: bool  # broker redelivery, a retry (attempt > 1) or a replay: effects may already exist


@dataclass(frozen=True)
class WorkerSpec:
    consumer: Consumer
    parse: Callable[[bytes, MessageContext], Any]  # raise PermanentError on a bad body
    handle: Callable[[Any, MessageContext], Awaitable[Sequence[MerchantEvent] | None]]
    prefetch: int = 64


def annotate(**fields: Any) -> None:
    """Adds fields to the one log line the runtime writes for the message being handled.

    A handler calls this instead of logging a line of its own: one structured line per message, with the
    message id, the outcome and what the handler found (a line costs ~0.1 ms of a worker's ~2 ms budget).
    """
    structlog.contextvars.bind_contextvars(**fields)


class FollowUpFailed(Exception):
    """A publish the outcome depends on (event, retry, dead letter) was not confirmed."""


# --- reasons never carry secrets -----------------------------------------------------------------

_INPUT_VALUE = re.compile(r"input_value=.*?(?=, input_type=|\]$|$)", re.DOTALL)


def _secret_values(body: bytes) -> list[str]:
    """Values of secret-named fields (accessToken, authCode, ...) anywhere in a JSON body."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and is_secret_field(key) and isinstance(item, str) and item:
                    found.append(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(document)
    return found


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, (PermanentError, TransientError)):
        return str(exc) or type(exc).__name__
    try:  # pydantic errors echo their input; name the fields and rules only
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_input=False)]
            return f"ValidationError: {'; '.join(parts)}"
    except ImportError:  # pragma: no cover
        pass
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def safe_reason(exc: BaseException, body: bytes) -> str:
    """One short line for the reason: masks every secret value the body holds, never includes the body."""
    reason = _INPUT_VALUE.sub("input_value=[redacted]", _describe_exception(exc))
    for secret in sorted(_secret_values(body), key=len, reverse=True):
        reason = reason.replace(secret, "[redacted]")
    reason = " ".join(reason.split())
    if len(reason) > REASON_MAX_LENGTH:
        reason = reason[: REASON_MAX_LENGTH - 1] + "…"
    return reason


# --- context ---------------------------------------------------------------------------------------


def message_context(consumer: Consumer, message: AbstractIncomingMessage) -> MessageContext:
    headers = dict(message.headers or {})
    attempt = max(1, h.header_int(headers, h.ATTEMPT, 1))
    provider = h.header_str(headers, h.PROVIDER)
    if provider is None and message.routing_key:
        # Only a notification's own routing key names a provider; a retry or replay goes by queue name.
        first_word = message.routing_key.split(".", 1)[0]
        provider = first_word if first_word in PROVIDERS else None
    return MessageContext(
        consumer=consumer,
        message_id=message.message_id or "",
        provider=provider,
        notify_type=h.header_str(headers, h.NOTIFY_TYPE),
        attempt=attempt,
        possibly_seen_before=bool(message.redelivered) or attempt > 1 or h.REPLAYED in headers,
    )


def dead_letter_message(message: AbstractIncomingMessage, consumer: Consumer, reason: str,
                        attempts: int) -> aio_pika.Message:
    headers = dict(message.headers or {})
    headers.update({
        h.DEAD_REASON: reason,
        h.DEAD_ATTEMPTS: attempts,
        h.DEAD_QUEUE: consumer.value,
        h.DEAD_AT: h.utc_now_iso(),
    })
    return h.copy_with_headers(message, headers)


def event_message(event: MerchantEvent) -> aio_pika.Message:
    return aio_pika.Message(
        body=event.to_json(),
        headers={h.PROVIDER: event.data.provider, h.NOTIFY_TYPE: event.type, h.ATTEMPT: 1},
        content_type=h.JSON_CONTENT_TYPE,
        message_id=event.id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


def event_frame(event: MerchantEvent) -> tuple[bytes, aiormq.spec.Basic.Properties]:
    """The same message as :func:`event_message`, built straight as AMQP properties: on the hot path an
    aio_pika.Message costs more than the publish it describes."""
    return event.to_json(), aiormq.spec.Basic.Properties(
        content_type=h.JSON_CONTENT_TYPE,
        delivery_mode=_PERSISTENT,
        headers={h.PROVIDER: event.data.provider, h.NOTIFY_TYPE: event.type, h.ATTEMPT: 1},
        message_id=event.id,
    )


# --- metrics: label children resolved once, not per message ----------------------------------------


@functools.cache
def _handling_seconds(queue: str) -> Any:
    return MESSAGE_HANDLING_SECONDS.labels(queue=queue)


@functools.cache
def _processed(queue: str, outcome: str) -> Any:
    return MESSAGES_PROCESSED.labels(queue=queue, outcome=outcome)


# --- the runtime -------------------------------------------------------------------------------------


class _ConsumerState:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.channel: AbstractRobustChannel | None = None
        self.queue: AbstractRobustQueue | None = None
        self.consumer_tag: str | None = None


class WorkerRuntime:
    """Runs the given consumers on one robust broker connection, with an optional health server."""

    def __init__(self, settings: Settings, specs: Sequence[WorkerSpec], *, broker: Broker | None = None,
                 http_port: int | None = None, drain_timeout: float = DRAIN_TIMEOUT_SECONDS) -> None:
        if not specs:
            raise ValueError("no consumers to run")
        self.settings = settings
        self.topology: Topology = build_topology(settings)
        names = ",".join(spec.consumer.value for spec in specs)
        self.broker = broker or Broker(settings.rabbitmq_url, self.topology,
                                       connection_name=f"authnotify-worker:{names}")
        self._own_broker = broker is None
        self._consumers = [_ConsumerState(spec) for spec in specs]
        self._publish_channel: AbstractRobustChannel | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._started = asyncio.Event()
        self._start_task: asyncio.Task[None] | None = None
        self._failed = asyncio.Event()
        self.failure: BaseException | None = None
        self._http_port = settings.worker_http_port if http_port is None else http_port
        self._http_runner: web.AppRunner | None = None
        self.drain_timeout = drain_timeout

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the health server and, in the background, the broker connection and the consumers."""
        if self._http_port:
            await self._start_http()
        self.broker.start()
        self._start_task = asyncio.create_task(self._start_consumers(), name="worker-start")
        # Read at scrape time; this process's broker is the one that counts (it replaces any earlier reader).
        BROKER_CONNECTED.set_function(lambda: 1.0 if self.broker.is_open else 0.0)

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._started.wait(), timeout)

    @property
    def ready(self) -> bool:
        if not self._started.is_set() or self._stopping or not self.broker.is_open:
            return False
        return all(state.channel is not None and not state.channel.is_closed and state.consumer_tag
                   for state in self._consumers)

    async def wait_failed(self) -> BaseException:
        """Returns the error if the consumers could not be started (e.g. a queue with other arguments)."""
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    async def _start_consumers(self) -> None:
        try:
            await self._open_consumers()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("consumer_start_failed", error=type(exc).__name__, detail=str(exc)[:200])
            self.failure = exc
            self._failed.set()

    async def _open_consumers(self) -> None:
        await self.broker.wait_connected()
        self._publish_channel = await self.broker.channel(publisher_confirms=True, on_return_raises=True)
        for state in self._consumers:
            spec = state.spec
            state.channel = await self.broker.channel(publisher_confirms=True, prefetch_count=spec.prefetch)
            queue_name = self.topology.consumer_queue(spec.consumer)
            arguments = next(q.arguments for q in self.topology.queues() if q.name == queue_name)
            # Same arguments as the topology: the robust queue re-declares with them after a reconnect.
            state.queue = await state.channel.declare_queue(
                queue_name, durable=True, arguments=arguments
            )
            assert state.queue is not None
            state.consumer_tag = await state.queue.consume(self._callback_for(spec))
            log.info("consumer_started", consumer=spec.consumer.value, prefetch=spec.prefetch)
        self._started.set()

    async def stop(self) -> None:
        """Stops consuming, lets held messages finish (bounded), then closes everything."""
        if self._stopping:
            return
        self._stopping = True
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._start_task
        for state in self._consumers:
            if state.queue is not None and state.consumer_tag is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(state.queue.cancel(state.consumer_tag), 5)
        held = len(self._inflight)
        if held:
            log.info("draining", messages=held, timeout_seconds=self.drain_timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), self.drain_timeout)
        except asyncio.TimeoutError:
            # Unacked messages go back to the queue when the connection closes: nothing is lost.
            log.warning("drain_timeout", messages=len(self._inflight))
            for task in list(self._inflight):
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
        for state in self._consumers:
            if state.channel is not None:
                with contextlib.suppress(Exception):
                    await state.channel.close()
        if self._publish_channel is not None:
            with contextlib.suppress(Exception):
                await self._publish_channel.close()
        if self._own_broker:
            await self.broker.close()
        BROKER_CONNECTED.set_function(lambda: 0.0)
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        log.info("worker_stopped")

    # -- health server -----------------------------------------------------------------------------

    async def _start_http(self) -> None:
        app = web.Application()

        async def healthz(_request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_request: web.Request) -> web.Response:
            ready = self.ready
            return web.json_response({"status": "ready" if ready else "not ready"}, status=200 if ready else 503)

        async def metrics(_request: web.Request) -> web.Response:
            body, content_type = render_metrics()
            return web.Response(body=body, headers={"Content-Type": content_type})

        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        self._http_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._http_runner.setup()
        site = web.TCPSite(self._http_runner, self.settings.http_host, self._http_port)
        await site.start()
        log.info("health_server_started", port=self._http_port)

    # -- one message ---------------------------------------------------------------------------------

    def _callback_for(self, spec: WorkerSpec) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            if self._stopping:
                # Not started before the stop: give it back untouched rather than begin new work.
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                return
            task = asyncio.current_task()
            assert task is not None
            self._inflight.add(task)
            self._idle.clear()
            try:
                await self._process(spec, message)
            finally:
                self._inflight.discard(task)
                if not self._inflight:
                    self._idle.set()

        return on_message

    async def _process(self, spec: WorkerSpec, message: AbstractIncomingMessage) -> None:
        consumer = spec.consumer
        queue_label = consumer.value
        started = time.perf_counter()
        context = message_context(consumer, message)
        with structlog.contextvars.bound_contextvars(
            message_id=context.message_id, consumer=queue_label, attempt=context.attempt
        ):
            outcome, reason, events = await self._run_handler(spec, message, context)
            try:
                if outcome == "ok":
                    for event in events:
                        body, properties = event_frame(event)
                        await self._publish_frame(
                            body, properties, self.topology.notifications_exchange, event_routing_key(event.type)
                        )
                elif outcome == "retried":
                    step = self.topology.retry_steps(consumer)[context.attempt - 1]
                    headers = dict(message.headers or {})
                    headers[h.ATTEMPT] = context.attempt + 1
                    headers[h.LAST_ERROR] = reason
                    await self._publish(h.copy_with_headers(message, headers), "", step.queue)
                else:
                    await self._publish(
                        dead_letter_message(message, consumer, reason or "unknown", context.attempt),
                        "", self.topology.dead_letter_queue(consumer),
                    )
                await message.ack()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Not acked: the broker gives the message back (now, or when the connection returns).
                log.warning("message_requeued", outcome=outcome, reason=reason,
                            error=f"{type(exc).__name__}")
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                return
            finally:
                _handling_seconds(queue_label).observe(time.perf_counter() - started)
            _processed(queue_label, outcome).inc()
            if outcome == "ok":
                log.info("message_processed", outcome=outcome, events=len(events))
            else:
                log.warning("message_failed", outcome=outcome, reason=reason)

    async def _run_handler(self, spec: WorkerSpec, message: AbstractIncomingMessage,
                           context: MessageContext) -> tuple[str, str | None, list[MerchantEvent]]:
        """Returns (outcome, reason, events): outcome is ok, retried or dead-lettered."""
        try:
            parsed = spec.parse(message.body, context)
            if inspect.isawaitable(parsed):
                parsed = await parsed
            events = await spec.handle(parsed, context)
        except asyncio.CancelledError:
            raise
        except PermanentError as exc:
            return "dead-lettered", safe_reason(exc, message.body), []
        except Exception as exc:  # TransientError and anything unexpected: retry
            reason = safe_reason(exc, message.body)
            if context.attempt < self.topology.max_attempts:
                return "retried", reason, []
            return "dead-lettered", reason, []
        return "ok", None, list(events or ())

    async def _publish(self, message: aio_pika.Message, exchange: str, routing_key: str) -> None:
        await self._publish_frame(message.body, message.properties, exchange, routing_key)

    async def _publish_frame(self, body: bytes, properties: aiormq.spec.Basic.Properties, exchange: str,
                             routing_key: str) -> None:
        """Publishes and waits for the broker's confirm; FollowUpFailed (or a channel error) otherwise."""
        channel = self._publish_channel
        if channel is None or channel.is_closed:
            raise FollowUpFailed("publish channel is not open")
        try:
            # asyncio.timeout, not wait_for: no extra task per publish. The aiormq channel under the robust
            # one was opened with confirms and on_return_raises, so an unroutable message raises.
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                underlay = await channel.get_underlay_channel()
                confirmation = await underlay.basic_publish(
                    body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=True
                )
        except TimeoutError:
            raise FollowUpFailed(f"publish not confirmed within {PUBLISH_TIMEOUT_SECONDS:g}s") from None
        if confirmation is not None and not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise FollowUpFailed(f"publish not confirmed: {type(confirmation).__name__}")
