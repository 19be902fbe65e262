"""Every exchange, queue, binding and retry queue, declared as data in one place (docs/queues.md).

Wiring:

* ``{ns}.notifications`` (topic) receives what the ingress publishes, routing key
  ``{provider}.{authorizationNotifyType}``, the merchant events the workers and the scheduler emit, routing
  key ``event.{type}``, and the lifecycle commands, routing key ``command.{consumer}`` (a refresh request
  from the scheduler or the API, a revocation from the CLI or the API). Its alternate exchange
  ``{ns}.unrouted`` (fanout) catches everything no queue takes and keeps it in queue ``{ns}.unrouted``.
* One consumer queue per worker, each with a dead-letter queue ``{ns}.{consumer}.dead``.
* One delay queue per consumer and retry delay, ``{ns}.{consumer}.retry.{delay}``: a message waits there
  for the queue's TTL, then the broker dead-letters it back into the consumer queue. One queue per delay,
  because messages expire only at the head of a queue. Each consumer has its own schedule
  (``AUTHNOTIFY_RETRY_DELAYS_<CONSUMER>``, see :meth:`authnotify.config.Settings.retry_delays_for`).

Quorum queues dead-letter at-most-once unless declared with ``x-dead-letter-strategy=at-least-once`` and
``x-overflow=reject-publish``; every queue the broker dead-letters from is declared that way.

Quorum queues count every return of a message (a reject, a requeue, a channel closed without ack) and, past
their delivery limit, drop it. RabbitMQ 4.x gives every quorum queue a limit of 20 unless one is set, and
``dlq list`` returns what it shows by closing its channel: so the queues that keep messages for people (the
dead-letter queues and ``{ns}.unrouted``) are declared with a limit no listing ever reaches. ``-1`` would say
"unlimited" on 4.x, but RabbitMQ 3.x reads it as a limit below the first return and drops the message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, ExchangeType

from authnotify.alipay.notifications import AUTHCODE_CREATED, NOTIFY_TYPES, TOKEN_CANCELED, TOKEN_CREATED
from authnotify.config.settings import DEFAULT_RETRY_DELAYS
from authnotify.observability.logging import get_logger

log = get_logger("authnotify.topology")


class QueueType(StrEnum):
    QUORUM = "quorum"
    CLASSIC = "classic"


class Consumer(StrEnum):
    """Every consumer, in one list; the value is the name used in commands, queue names and metrics."""

    AUTHCODE_CREATED = "authcode-created"
    TOKEN_CREATED = "token-created"
    TOKEN_CANCELED = "token-canceled"
    TOKEN_REFRESH = "token-refresh"
    REVOCATIONS = "revocations"
    MERCHANT_EVENTS = "merchant-events"


CONSUMER_NAMES: tuple[str, ...] = tuple(consumer.value for consumer in Consumer)

NOTIFY_TYPE_OF_CONSUMER: dict[Consumer, str] = {
    Consumer.AUTHCODE_CREATED: AUTHCODE_CREATED,
    Consumer.TOKEN_CREATED: TOKEN_CREATED,
    Consumer.TOKEN_CANCELED: TOKEN_CANCELED,
}
UNKNOWN_NOTIFY_TYPE = "unknown"
EVENT_ROUTING_PREFIX = "event"
COMMAND_ROUTING_PREFIX = "command"
# The consumers that take commands rather than notifications or events.
COMMAND_CONSUMERS: tuple[Consumer, ...] = (Consumer.TOKEN_REFRESH, Consumer.REVOCATIONS)

# A message that kills its consumer over and over (it never gets far enough to be retried) is
# dead-lettered by the broker after this many deliveries, instead of looping forever.
POISON_DELIVERY_LIMIT = 50
# The queues people read (dead letters, unrouted): effectively unlimited, the same on RabbitMQ 3.x and 4.x.
KEEP_DELIVERY_LIMIT = 2**31 - 1


def notification_routing_key(provider: str, notify_type: str | None) -> str:
    if notify_type not in NOTIFY_TYPES:
        notify_type = UNKNOWN_NOTIFY_TYPE
    return f"{provider}.{notify_type}"


def event_routing_key(event_type: str) -> str:
    return f"{EVENT_ROUTING_PREFIX}.{event_type}"


def command_routing_key(consumer: Consumer) -> str:
    return f"{COMMAND_ROUTING_PREFIX}.{consumer.value}"


def binding_pattern(consumer: Consumer) -> str:
    """What each consumer queue is bound to on the notifications exchange."""
    if consumer is Consumer.MERCHANT_EVENTS:
        return f"{EVENT_ROUTING_PREFIX}.#"
    if consumer in COMMAND_CONSUMERS:
        return command_routing_key(consumer)
    return f"*.{NOTIFY_TYPE_OF_CONSUMER[consumer]}"


def delay_label(seconds: float) -> str:
    """10.0 -> "10s", 60.0 -> "1m", 7200.0 -> "2h", 0.5 -> "500ms": the suffix of a delay queue."""
    milliseconds = round(seconds * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if milliseconds % size == 0:
            return f"{milliseconds // size}{unit}"
    return f"{milliseconds}ms"


@dataclass(frozen=True)
class Binding:
    exchange: str
    routing_key: str


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: ExchangeType
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any]
    bindings: tuple[Binding, ...] = ()
    # Arguments a queue declared by an earlier version lacks: such a queue is kept as it is, with a warning
    # (queue arguments cannot change; a policy can add the setting).
    added_later: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetryStep:
    delay_seconds: float
    queue: str


@dataclass(frozen=True)
class Topology:
    namespace: str
    queue_type: QueueType
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS  # of every consumer without its own below
    consumer_retry_delays: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (consumer name, delays)

    def delays_of(self, consumer: Consumer | str) -> tuple[float, ...]:
        name = Consumer(consumer).value
        for owner, delays in self.consumer_retry_delays:
            if owner == name:
                return delays
        return self.retry_delays

    @property
    def notifications_exchange(self) -> str:
        return f"{self.namespace}.notifications"

    @property
    def unrouted_exchange(self) -> str:
        return f"{self.namespace}.unrouted"

    @property
    def unrouted_queue(self) -> str:
        return f"{self.namespace}.unrouted"

    def consumer_queue(self, consumer: Consumer | str) -> str:
        return f"{self.namespace}.{Consumer(consumer).value}"

    def dead_letter_queue(self, consumer: Consumer | str) -> str:
        return f"{self.consumer_queue(consumer)}.dead"

    def retry_steps(self, consumer: Consumer | str) -> tuple[RetryStep, ...]:
        base = self.consumer_queue(consumer)
        return tuple(
            RetryStep(delay, f"{base}.retry.{delay_label(delay)}") for delay in self.delays_of(consumer)
        )

    def max_attempts(self, consumer: Consumer | str) -> int:
        """N delays mean N+1 attempts, then the message is dead-lettered."""
        return len(self.delays_of(consumer)) + 1

    def consumer_of_queue(self, queue: str) -> Consumer | None:
        for consumer in Consumer:
            if queue in (self.consumer_queue(consumer), self.dead_letter_queue(consumer)):
                return consumer
        return None

    # --- what gets declared -------------------------------------------------------------------

    def _queue_arguments(self, *, dead_letter_to: str | None = None, ttl_ms: int | None = None,
                         delivery_limit: int | None = None) -> dict[str, Any]:
        arguments: dict[str, Any] = {"x-queue-type": self.queue_type.value}
        if ttl_ms is not None:
            arguments["x-message-ttl"] = ttl_ms
        if dead_letter_to is not None:
            arguments["x-dead-letter-exchange"] = ""
            arguments["x-dead-letter-routing-key"] = dead_letter_to
            if self.queue_type is QueueType.QUORUM:
                arguments["x-dead-letter-strategy"] = "at-least-once"
                arguments["x-overflow"] = "reject-publish"
        if delivery_limit is not None and self.queue_type is QueueType.QUORUM:
            arguments["x-delivery-limit"] = delivery_limit
        return arguments

    def exchanges(self) -> tuple[ExchangeSpec, ...]:
        return (
            ExchangeSpec(self.unrouted_exchange, ExchangeType.FANOUT),
            ExchangeSpec(
                self.notifications_exchange,
                ExchangeType.TOPIC,
                {"alternate-exchange": self.unrouted_exchange},
            ),
        )

    def queues(self) -> tuple[QueueSpec, ...]:
        kept = ("x-delivery-limit",) if self.queue_type is QueueType.QUORUM else ()
        specs: list[QueueSpec] = [
            QueueSpec(
                self.unrouted_queue,
                self._queue_arguments(delivery_limit=KEEP_DELIVERY_LIMIT),
                (Binding(self.unrouted_exchange, ""),),
                added_later=kept,
            )
        ]
        for consumer in Consumer:
            queue = self.consumer_queue(consumer)
            pattern = binding_pattern(consumer)
            specs.append(QueueSpec(self.dead_letter_queue(consumer),
                                   self._queue_arguments(delivery_limit=KEEP_DELIVERY_LIMIT), added_later=kept))
            specs.append(
                QueueSpec(
                    queue,
                    self._queue_arguments(
                        dead_letter_to=self.dead_letter_queue(consumer),
                        delivery_limit=POISON_DELIVERY_LIMIT,
                    ),
                    (Binding(self.notifications_exchange, pattern),),
                )
            )
            # A delay listed twice (merchant-events' 10h,10h) is one queue, waited on twice.
            for step in {step.queue: step for step in self.retry_steps(consumer)}.values():
                specs.append(
                    QueueSpec(
                        step.queue,
                        self._queue_arguments(
                            dead_letter_to=queue, ttl_ms=round(step.delay_seconds * 1000)
                        ),
                    )
                )
        return tuple(specs)

    def all_queue_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.queues())

    def queue(self, name: str) -> QueueSpec:
        """The declaration of one queue of this topology; KeyError for a name it does not have."""
        for spec in self.queues():
            if spec.name == name:
                return spec
        raise KeyError(name)


def build_topology(settings: Any) -> Topology:
    return Topology(
        namespace=settings.namespace,
        queue_type=QueueType(settings.queue_type),
        consumer_retry_delays=tuple((consumer.value, settings.retry_delays_for(consumer.value))
                                    for consumer in Consumer),
    )


async def declare_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Idempotent: re-declaring with the same arguments is a no-op for the broker.

    A broker user without the configure permission (each process has a user of its own, allowed only what it
    does: see deploy/) cannot declare: then the topology, declared by the operator's user
    (``authnotify topology``), is checked passively instead, and a missing part is an error as before."""
    try:
        await _declare_everything(channel, topology)
    except aiormq.exceptions.ChannelAccessRefused:
        await channel.reopen()
        await check_topology(channel, topology)
        log.info("topology_checked", reason="this broker user may not declare; the topology exists")


async def check_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Passive declarations of every exchange and queue: ChannelNotFoundEntity when one is missing."""
    for spec in topology.exchanges():
        await channel.get_exchange(spec.name, ensure=True)
    for queue_spec in topology.queues():
        await channel.declare_queue(queue_spec.name, passive=True)


async def _declare_everything(channel: AbstractChannel, topology: Topology) -> None:
    exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
    for spec in topology.exchanges():
        exchanges[spec.name] = await channel.declare_exchange(
            spec.name, spec.type, durable=True, arguments=spec.arguments or None
        )
    for queue_spec in topology.queues():
        queue = await _declare_queue(channel, queue_spec)
        for binding in queue_spec.bindings:
            await queue.bind(exchanges[binding.exchange], routing_key=binding.routing_key)


async def _declare_queue(channel: AbstractChannel, spec: QueueSpec) -> aio_pika.abc.AbstractQueue:
    try:
        return await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        if not spec.added_later or not any(f"'{name}'" in str(exc) for name in spec.added_later):
            raise
    # Declared by an earlier version without the argument: keep it (the refused declare closed the channel).
    await channel.reopen()
    earlier = {k: v for k, v in spec.arguments.items() if k not in spec.added_later}
    queue = await channel.declare_queue(spec.name, durable=True, arguments=earlier)
    log.warning("queue_declared_by_an_earlier_version", queue=spec.name, missing=list(spec.added_later),
                advice="on RabbitMQ 4.x set a delivery-limit policy on it (see docs/operations.md), or its "
                       "messages are dropped after 20 returns")
    return queue


async def delete_topology(channel: AbstractChannel, topology: Topology,
                          queue_names: Iterable[str] | None = None) -> None:
    """For tests and teardown: quorum queues refuse ``if_unused``, so both flags are off."""
    for name in queue_names or topology.all_queue_names():
        await channel.queue_delete(name, if_unused=False, if_empty=False)
    for spec in reversed(topology.exchanges()):
        await channel.exchange_delete(spec.name, if_unused=False)
