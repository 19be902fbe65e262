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

Batches: the deliveries of a prefetch window are handled concurrently, each in its own task; their store
writes meet in one transaction (the store's group commit), and the messages whose handling ends in the same
turn of the event loop are settled together (:class:`Settler`): every follow-up published at once with the
confirms awaited together, then one ``basic.ack`` with ``multiple`` per run of consecutive delivery tags
that all succeeded. A message whose follow-up fails is requeued alone; the others are acked as usual.

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
from collections.abc import Awaitable, Callable, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from pydantic import BaseModel, ValidationError

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

ModelT = TypeVar("ModelT", bound=BaseModel)

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


def json_model_parser(model: type[ModelT], what: str) -> Callable[[bytes, MessageContext], ModelT]:
    """The parse step of a consumer whose body is one pydantic model as JSON: anything else is a
    :class:`PermanentError` naming the first field and rule that failed, never a value."""

    def parse(body: bytes, context: MessageContext) -> ModelT:
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            location = ".".join(str(part) for part in first.get("loc", ())) or "body"
            raise PermanentError(f"not {what}: {location}: {first.get('msg', 'invalid')}") from None

    return parse


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
    @property
    def delivery_tag(self) -> int | None: ...
    @property
    def channel(self) -> Any:
        """The channel it came on: delivery tags count per channel (a reconnect starts again at 1)."""
        ...
    async def ack(self, multiple: bool = False) -> None: ...
    async def nack(self, multiple: bool = False, requeue: bool = True) -> None: ...


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


# --- settling: follow-ups published together, acknowledgements coalesced -------------------------------


class NotAcked(Exception):
    """The message was not acknowledged: it is back in the queue, or will be when the connection returns.
    Its text says what stopped it: the type of the error of a publish or an ack that failed."""


@dataclass(frozen=True, slots=True)
class AckFrame:
    """One frame to send on a channel: ``basic.ack`` (``multiple``: every unsettled tag up to ``tag``) or a
    ``basic.nack`` that requeues; ``covers`` are the delivery tags it settles."""

    tag: int
    ack: bool
    multiple: bool
    covers: tuple[int, ...]


def plan_acknowledgements(settled: Sequence[tuple[int, bool]], unsettled: Set[int]) -> list[AckFrame]:
    """The frames that settle ``settled`` ((delivery tag, acked?) of one channel), in tag order.

    ``unsettled``: every delivery tag of the channel not acknowledged yet, those of ``settled`` included.
    A run of consecutive tags to ack (a requeued message ends it) takes one ``multiple`` ack when no tag at or
    below its end is still unsettled outside it: a message held by another batch is never acked with it.
    """
    left = set(unsettled)
    frames: list[AckFrame] = []
    run: list[int] = []

    def close_run() -> None:
        if not run:
            return
        members = set(run)
        below = min((tag for tag in left if tag not in members), default=None)
        coalesced = [tag for tag in run if below is None or tag < below]
        if len(coalesced) > 1 and coalesced[-1] - coalesced[0] == len(coalesced) - 1:
            frames.append(AckFrame(coalesced[-1], True, True, tuple(coalesced)))
            singles = run[len(coalesced):]
        else:
            singles = run
        frames.extend(AckFrame(tag, True, False, (tag,)) for tag in singles)
        left.difference_update(run)
        run.clear()

    for tag, acked in sorted(settled):
        if acked:
            run.append(tag)
        else:
            close_run()
            frames.append(AckFrame(tag, False, False, (tag,)))
            left.discard(tag)
    close_run()
    return frames


@dataclass(slots=True)
class _Settling:
    delivery: Delivery
    follow_ups: list[FollowUp]
    done: asyncio.Future[None]


class Settler:
    """Settles together the messages whose handling ended in the same turn of the event loop, or while the
    previous settlement waited for its confirms: their follow-ups published at once (frames pipelined,
    confirms awaited together), then each acked once all of its own are confirmed, with one ``multiple`` ack
    per run of delivery tags where the broker allows it.

    A message whose follow-up failed is requeued alone; the others of its batch are acked as usual.
    """

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._pending: list[_Settling] = []
        self._unsettled: dict[Any, set[int]] = {}  # channel -> delivery tags received and not settled
        self._flushing: asyncio.Task[None] | None = None

    def received(self, delivery: Delivery) -> None:
        """Called for each delivery as it arrives (in delivery-tag order), before it is handled."""
        tag = delivery.delivery_tag
        if tag is None:
            return
        channel = delivery.channel
        tags = self._unsettled.get(channel)
        if tags is None:  # a new channel (or a reconnect): the tags of closed ones are void
            for old in [old for old in self._unsettled if getattr(old, "is_closed", False)]:
                del self._unsettled[old]
            tags = self._unsettled[channel] = set()
        tags.add(tag)

    async def settle(self, delivery: Delivery, follow_ups: list[FollowUp]) -> None:
        """Returns once the follow-ups are confirmed and the message acked; :class:`NotAcked` otherwise."""
        settling = _Settling(delivery, follow_ups, asyncio.get_running_loop().create_future())
        self._pending.append(settling)
        if self._flushing is None:  # none under way: one starts next turn, after the others of this one joined
            self._flushing = asyncio.create_task(self._flush(), name="consumer-settle")
        await settling.done

    async def give_back(self, delivery: Delivery) -> None:
        """Requeues a message that cannot be settled (best effort: a closed channel gives it back anyway)."""
        self._forget(delivery)
        with contextlib.suppress(Exception):
            await delivery.nack(requeue=True)

    def _forget(self, delivery: Delivery) -> None:
        tags = self._unsettled.get(delivery.channel)
        if tags is not None and delivery.delivery_tag is not None:
            tags.discard(delivery.delivery_tag)

    async def _flush(self) -> None:
        # One batch at a time: what settles while one waits for its confirms makes the next (the busier the
        # worker, the larger the batches, and the fewer the acks).
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._settle_batch(batch)
                finally:  # whatever stopped it (a cancelled stop, a bug), no message waits forever
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(NotAcked("settlement interrupted"))
        finally:
            self._flushing = None

    async def _settle_batch(self, batch: list[_Settling]) -> None:
        calls = [(settling, self.publisher.publish(f.message, exchange=f.exchange, routing_key=f.routing_key))
                 for settling in batch for f in settling.follow_ups]
        results = await asyncio.gather(*(call for _, call in calls), return_exceptions=True)
        failures: dict[int, BaseException] = {}
        for (settling, _), result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                failures.setdefault(id(settling), result)
        by_channel: dict[Any, list[_Settling]] = {}
        for settling in batch:
            by_channel.setdefault(settling.delivery.channel, []).append(settling)
        for channel, items in by_channel.items():
            await self._acknowledge(channel, items, failures)

    async def _acknowledge(self, channel: Any, items: list[_Settling], failures: dict[int, BaseException]) -> None:
        untagged = [item for item in items if item.delivery.delivery_tag is None]
        tagged = {item.delivery.delivery_tag: item for item in items if item.delivery.delivery_tag is not None}
        unsettled = self._unsettled.get(channel, set())
        frames = plan_acknowledgements([(tag, id(item) not in failures) for tag, item in tagged.items()],
                                       unsettled | tagged.keys())
        frames.extend(AckFrame(0, id(item) not in failures, False, ()) for item in untagged)
        untagged_items = iter(untagged)
        for frame in frames:
            covered = [tagged[tag] for tag in frame.covers] if frame.covers else [next(untagged_items)]
            sender = covered[-1].delivery
            error: BaseException | None = None
            try:
                if frame.ack:
                    await sender.ack(multiple=frame.multiple)
                else:
                    await sender.nack(requeue=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # channel or connection gone: the broker redelivers
                error = exc
            unsettled.difference_update(frame.covers)
            for item in covered:
                failure = failures.get(id(item)) or error
                if item.done.done():  # its task was cancelled meanwhile (a drain timeout)
                    continue
                if failure is None:
                    item.done.set_result(None)
                else:
                    item.done.set_exception(NotAcked(type(failure).__name__))

    async def close(self) -> None:
        """Waits for the settlements under way."""
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)


# --- one message, from handler to acknowledgement ------------------------------------------------------


class DeliveryProcessor:
    """Takes each delivery from handler to acknowledgement; messages that finish together are settled
    together (:class:`Settler`), through ``publisher``."""

    def __init__(self, topology: Topology, publisher: Publisher) -> None:
        self.topology = topology
        self.publisher = publisher
        self.settler = Settler(publisher)

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
                try:
                    planned = follow_ups(decision, delivery, context, self.topology)
                except Exception:
                    await self.settler.give_back(delivery)
                    raise
                await self.settler.settle(delivery, planned)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Not acked: the broker gives the message back (now, or when the connection returns).
                log.warning("message_requeued", outcome=decision.outcome.value, reason=decision.reason,
                            error=str(exc) if isinstance(exc, NotAcked) else type(exc).__name__)
                tracing.record_outcome("requeued", failed=True)
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
        await self.processor.settler.close()
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
            self.processor.settler.received(message)
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
