"""The consumer runtime: the one place that maps a handler's outcome to AMQP.

A handler parses and handles; it returns merchant events or raises (:mod:`authnotify.errors`). Then:

* success: the returned events are published (confirmed), then the message is acked;
* :class:`~authnotify.errors.PermanentError`: the message, unchanged, goes to ``{ns}.{consumer}.dead``
  (confirmed), then it is acked;
* anything else (:class:`~authnotify.errors.TransientError` or an unexpected error): it goes to the retry
  queue of this attempt with the next attempt number (confirmed), then it is acked; after the last attempt
  it is dead-lettered with the last reason.

Nothing is acked before its follow-ups are confirmed. When a follow-up cannot be published (broker
trouble), the message is not acked: it is requeued if the channel still works, and otherwise redelivered by
the broker once the connection is back. So every step is at-least-once, and handlers are idempotent.

:func:`decide` (what should happen) and :class:`DeliveryProcessor` (doing it with a publisher) need no
broker; :class:`ConsumerRuntime` feeds them deliveries from RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import inspect
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from pydantic import ValidationError

from authnotify.config import PROVIDERS
from authnotify.domain.events import MerchantEvent
from authnotify.errors import PermanentError, TransientError
from authnotify.messaging import headers as h
from authnotify.messaging.connection import Broker
from authnotify.messaging.messages import (
    OutgoingMessage,
    ReceivedMessage,
    dead_letter_message,
    event_message,
    retry_message,
)
from authnotify.messaging.publisher import Publisher
from authnotify.messaging.topology import Consumer, Topology, event_routing_key
from authnotify.observability import tracing
from authnotify.observability.logging import get_logger, handling_body
from authnotify.observability.metrics import BROKER_CONNECTED, MESSAGE_HANDLING_SECONDS, MESSAGES_PROCESSED
from authnotify.observability.redaction import REDACTED, mask_secret_values

log = get_logger("authnotify.worker")

DRAIN_TIMEOUT_SECONDS = 30.0
REASON_MAX_LENGTH = 300


@dataclass(frozen=True)
class MessageContext:
    consumer: Consumer
    message_id: str
    provider: str | None  # from the PROVIDER header (fallback: first word of the routing key)
    notify_type: str | None
    attempt: int  # 1 on first delivery
    possibly_seen_before: bool  # broker redelivery, a retry (attempt > 1) or a replay: effects may already exist


Parse = Callable[[bytes, MessageContext], Any]  # raises PermanentError on a bad body; may be async
Handle = Callable[[Any, MessageContext], Awaitable[Sequence[MerchantEvent] | None]]


@dataclass(frozen=True)
class ConsumerSpec:
    """One consumer: its queue, how its messages are parsed, and its handler."""

    consumer: Consumer
    parse: Parse
    handle: Handle
    prefetch: int = 64


class Delivery(ReceivedMessage, Protocol):
    """A message taken from a consumer queue (an aio-pika incoming message, or a test's own)."""

    @property
    def redelivered(self) -> bool | None: ...
    @property
    def routing_key(self) -> str | None: ...
    async def ack(self) -> None: ...
    async def nack(self, *, requeue: bool = True) -> None: ...


def message_context(consumer: Consumer, delivery: Delivery) -> MessageContext:
    headers = dict(delivery.headers or {})
    attempt = max(1, h.header_int(headers, h.ATTEMPT, 1))
    provider = h.header_str(headers, h.PROVIDER)
    if provider is None and delivery.routing_key:
        # Only a notification's own routing key names a provider; a retry or replay goes by queue name.
        first_word = delivery.routing_key.split(".", 1)[0]
        provider = first_word if first_word in PROVIDERS else None
    return MessageContext(
        consumer=consumer,
        message_id=delivery.message_id or "",
        provider=provider,
        notify_type=h.header_str(headers, h.NOTIFY_TYPE),
        attempt=attempt,
        possibly_seen_before=bool(delivery.redelivered) or attempt > 1 or h.REPLAYED in headers,
    )


# --- reasons: one short line, never a secret -------------------------------------------------------

_INPUT_VALUE = re.compile(r"input_value=.*?(?=, input_type=|\]$|$)", re.DOTALL)


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, (PermanentError, TransientError)):
        return str(exc) or type(exc).__name__
    if isinstance(exc, ValidationError):  # pydantic errors echo their input: name the fields and rules only
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_input=False)]
        return f"ValidationError: {'; '.join(parts)}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def failure_reason(exc: BaseException, body: bytes) -> str:
    """The dead-letter reason: one short line that masks every secret value the body holds.

    Never raises: when the description itself fails (whatever the body or the error is), the reason is the
    error's type alone, which carries no value from the body."""
    try:
        reason = _INPUT_VALUE.sub(f"input_value={REDACTED}", _describe_exception(exc))
        reason = " ".join(mask_secret_values(reason, body).split())
    except Exception:
        reason = f"{type(exc).__name__} (not described: describing it failed)"
    if len(reason) > REASON_MAX_LENGTH:
        reason = reason[: REASON_MAX_LENGTH - 1] + "…"
    return reason or type(exc).__name__


# --- what should happen to one message ---------------------------------------------------------------


class Outcome(enum.StrEnum):
    """The ``outcome`` label of the processed-messages metric and of the message's log line."""

    OK = "ok"
    RETRIED = "retried"
    DEAD_LETTERED = "dead-lettered"


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str | None = None
    events: list[MerchantEvent] = field(default_factory=list)
    unexpected: BaseException | None = None  # not a PermanentError or TransientError: its traceback is logged


async def decide(spec: ConsumerSpec, body: bytes, context: MessageContext, max_attempts: int) -> Decision:
    """Runs the handler on one message and says what is to become of it; never raises (but cancellation)."""
    try:
        return await _decide(spec, body, context, max_attempts)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the handling of a failure failed too: still an outcome, with a generic reason
        outcome = Outcome.RETRIED if context.attempt < max_attempts else Outcome.DEAD_LETTERED
        return Decision(outcome, f"{type(exc).__name__} while handling (no further detail)", unexpected=exc)


async def _decide(spec: ConsumerSpec, body: bytes, context: MessageContext, max_attempts: int) -> Decision:
    try:
        parsed = spec.parse(body, context)
        if inspect.isawaitable(parsed):
            parsed = await parsed
        events = await spec.handle(parsed, context)
    except asyncio.CancelledError:
        raise
    except PermanentError as exc:
        return Decision(Outcome.DEAD_LETTERED, failure_reason(exc, body))
    except Exception as exc:  # TransientError and anything unexpected: retry while attempts remain
        reason = failure_reason(exc, body)
        unexpected = None if isinstance(exc, TransientError) else exc
        if context.attempt < max_attempts:
            return Decision(Outcome.RETRIED, reason, unexpected=unexpected)
        return Decision(Outcome.DEAD_LETTERED, reason, unexpected=unexpected)
    return Decision(Outcome.OK, None, list(events or ()))


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A publish the outcome depends on: the message must not be acked before it is confirmed."""

    message: OutgoingMessage
    exchange: str
    routing_key: str


def follow_ups(decision: Decision, delivery: Delivery, context: MessageContext, topology: Topology) -> list[FollowUp]:
    if decision.outcome is Outcome.OK:
        return [FollowUp(event_message(event), topology.notifications_exchange, event_routing_key(event.type))
                for event in decision.events]
    reason = decision.reason or "unknown"
    if decision.outcome is Outcome.RETRIED:
        step = topology.retry_steps(context.consumer)[context.attempt - 1]
        return [FollowUp(retry_message(delivery, next_attempt=context.attempt + 1, reason=reason), "", step.queue)]
    return [FollowUp(
        dead_letter_message(delivery, consumer_name=context.consumer.value, reason=reason, attempts=context.attempt),
        "", topology.dead_letter_queue(context.consumer),
    )]


# --- metrics: label children resolved once, not per message ----------------------------------------


@functools.cache
def _handling_seconds(queue: str) -> Any:
    return MESSAGE_HANDLING_SECONDS.labels(queue=queue)


@functools.cache
def _processed(queue: str, outcome: str) -> Any:
    return MESSAGES_PROCESSED.labels(queue=queue, outcome=outcome)


class DeliveryProcessor:
    """Takes one delivery from handler to acknowledgement, publishing its follow-ups through ``publisher``."""

    def __init__(self, topology: Topology, publisher: Publisher) -> None:
        self.topology = topology
        self.publisher = publisher

    async def process(self, spec: ConsumerSpec, delivery: Delivery) -> Outcome | None:
        """Returns the outcome, or None when the message went back to the queue unacknowledged."""
        queue_label = spec.consumer.value
        started = time.perf_counter()
        context = message_context(spec.consumer, delivery)
        with structlog.contextvars.bound_contextvars(
            message_id=context.message_id, consumer=queue_label, attempt=context.attempt
        ), handling_body(delivery.body), tracing.message_span(
            queue_label, self.topology.namespace, delivery.headers, message_id=context.message_id,
            provider=context.provider, notify_type=context.notify_type, attempt=context.attempt,
        ):
            decision = await decide(spec, delivery.body, context, self.topology.max_attempts(spec.consumer))
            tracing.record_outcome(decision.outcome.value, failed=decision.outcome is not Outcome.OK)
            try:
                for follow_up in follow_ups(decision, delivery, context, self.topology):
                    await self.publisher.publish(follow_up.message, exchange=follow_up.exchange,
                                                 routing_key=follow_up.routing_key)
                await delivery.ack()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Not acked: the broker gives the message back (now, or when the connection returns).
                log.warning("message_requeued", outcome=decision.outcome.value, reason=decision.reason,
                            error=f"{type(exc).__name__}")
                tracing.record_outcome("requeued", failed=True)
                with contextlib.suppress(Exception):
                    await delivery.nack(requeue=True)
                return None
            finally:
                _handling_seconds(queue_label).observe(time.perf_counter() - started)
            _processed(queue_label, decision.outcome.value).inc()
            if decision.outcome is Outcome.OK:
                log.info("message_processed", outcome=decision.outcome.value, events=len(decision.events))
            else:  # an unexpected error keeps its traceback (redacted like the rest of the line)
                log.warning("message_failed", outcome=decision.outcome.value, reason=decision.reason,
                            exc_info=decision.unexpected)
            return decision.outcome


# --- the runtime on RabbitMQ ---------------------------------------------------------------------------


class _ConsumerState:
    def __init__(self, spec: ConsumerSpec) -> None:
        self.spec = spec
        self.channel: AbstractRobustChannel | None = None
        self.queue: AbstractRobustQueue | None = None
        self.consumer_tag: str | None = None


class ConsumerRuntime:
    """Runs the given consumers on one robust broker connection, publishing through ``publisher``."""

    def __init__(self, broker: Broker, publisher: Publisher, specs: Sequence[ConsumerSpec], *,
                 drain_timeout: float = DRAIN_TIMEOUT_SECONDS) -> None:
        if not specs:
            raise ValueError("no consumers to run")
        self.broker = broker
        self.topology: Topology = broker.topology
        self.processor = DeliveryProcessor(self.topology, publisher)
        self._consumers = [_ConsumerState(spec) for spec in specs]
        self._inflight: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._started = asyncio.Event()
        self._start_task: asyncio.Task[None] | None = None
        self._failed = asyncio.Event()
        self.failure: BaseException | None = None
        self.drain_timeout = drain_timeout

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the broker connection and, in the background, the consumers."""
        self.broker.start()
        self._start_task = asyncio.create_task(self._start_consumers(), name="consumers-start")
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
        for state in self._consumers:
            spec = state.spec
            state.channel = await self.broker.channel(publisher_confirms=True, prefetch_count=spec.prefetch)
            queue_spec = self.topology.queue(self.topology.consumer_queue(spec.consumer))
            # Same arguments as the topology: the robust queue re-declares with them after a reconnect.
            state.queue = await state.channel.declare_queue(queue_spec.name, durable=True,
                                                            arguments=queue_spec.arguments)
            assert state.queue is not None
            state.consumer_tag = await state.queue.consume(self._callback_for(spec))
            log.info("consumer_started", consumer=spec.consumer.value, prefetch=spec.prefetch)
        self._started.set()

    async def stop(self) -> None:
        """Stops consuming, lets held messages finish (bounded), then closes the consumers' channels."""
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
        except TimeoutError:
            # Unacked messages go back to the queue when the connection closes: nothing is lost.
            log.warning("drain_timeout", messages=len(self._inflight))
            for task in list(self._inflight):
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
        for state in self._consumers:
            if state.channel is not None:
                with contextlib.suppress(Exception):
                    await state.channel.close()
        BROKER_CONNECTED.set_function(lambda: 0.0)
        log.info("consumers_stopped")

    # -- one message ---------------------------------------------------------------------------------

    def _callback_for(self, spec: ConsumerSpec) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
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
                await self.processor.process(spec, message)
            finally:
                self._inflight.discard(task)
                if not self._inflight:
                    self._idle.set()

        return on_message
