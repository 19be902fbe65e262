"""Every exchange, queue, binding and retry queue, declared as data in one place (docs/queues.md).

Wiring:

* ``{ns}.notifications`` (topic) receives what the ingress publishes, routing key
  ``{provider}.{authorizationNotifyType}``, and the merchant events the workers emit, routing key
  ``event.{type}``. Its alternate exchange ``{ns}.unrouted`` (fanout) catches everything no queue takes
  and keeps it in queue ``{ns}.unrouted``.
* One consumer queue per worker, each with a dead-letter queue ``{ns}.{consumer}.dead``.
* One delay queue per consumer and retry delay, ``{ns}.{consumer}.retry.{delay}``: a message waits there
  for the queue's TTL, then the broker dead-letters it back into the consumer queue. One queue per delay,
  because messages expire only at the head of a queue.

Quorum queues dead-letter at-most-once unless declared with ``x-dead-letter-strategy=at-least-once`` and
``x-overflow=reject-publish``; every queue the broker dead-letters from is declared that way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, ExchangeType

from authnotify.alipay.notifications import AUTHCODE_CREATED, NOTIFY_TYPES, TOKEN_CANCELED, TOKEN_CREATED


class QueueType(StrEnum):
    QUORUM = "quorum"
    CLASSIC = "classic"


class Consumer(StrEnum):
    """Every consumer, in one list; the value is the name used in commands, queue names and metrics."""

    AUTHCODE_CREATED = "authcode-created"
    TOKEN_CREATED = "token-created"
    TOKEN_CANCELED = "token-canceled"
    MERCHANT_EVENTS = "merchant-events"


CONSUMER_NAMES: tuple[str, ...] = tuple(consumer.value for consumer in Consumer)

NOTIFY_TYPE_OF_CONSUMER: dict[Consumer, str] = {
    Consumer.AUTHCODE_CREATED: AUTHCODE_CREATED,
    Consumer.TOKEN_CREATED: TOKEN_CREATED,
    Consumer.TOKEN_CANCELED: TOKEN_CANCELED,
}
UNKNOWN_NOTIFY_TYPE = "unknown"
EVENT_ROUTING_PREFIX = "event"

# A message that kills its consumer over and over (it never gets far enough to be retried) is
# dead-lettered by the broker after this many deliveries, instead of looping forever.
POISON_DELIVERY_LIMIT = 50


def notification_routing_key(provider: str, notify_type: str | None) -> str:
    if notify_type not in NOTIFY_TYPES:
        notify_type = UNKNOWN_NOTIFY_TYPE
    return f"{provider}.{notify_type}"


def event_routing_key(event_type: str) -> str:
    return f"{EVENT_ROUTING_PREFIX}.{event_type}"


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


@dataclass(frozen=True)
class RetryStep:
    delay_seconds: float
    queue: str


@dataclass(frozen=True)
class Topology:
    namespace: str
    queue_type: QueueType
    retry_delays: tuple[float, ...]

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
            RetryStep(delay, f"{base}.retry.{delay_label(delay)}") for delay in self.retry_delays
        )

    @property
    def max_attempts(self) -> int:
        return len(self.retry_delays) + 1

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
        specs: list[QueueSpec] = [
            QueueSpec(
                self.unrouted_queue,
                self._queue_arguments(),
                (Binding(self.unrouted_exchange, ""),),
            )
        ]
        for consumer in Consumer:
            queue = self.consumer_queue(consumer)
            if consumer is Consumer.MERCHANT_EVENTS:
                pattern = f"{EVENT_ROUTING_PREFIX}.#"
            else:
                pattern = f"*.{NOTIFY_TYPE_OF_CONSUMER[consumer]}"
            specs.append(QueueSpec(self.dead_letter_queue(consumer), self._queue_arguments()))
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
            for step in self.retry_steps(consumer):
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
        retry_delays=tuple(settings.retry_delays),
    )


async def declare_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Idempotent: re-declaring with the same arguments is a no-op for the broker."""
    exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
    for spec in topology.exchanges():
        exchanges[spec.name] = await channel.declare_exchange(
            spec.name, spec.type, durable=True, arguments=spec.arguments or None
        )
    for queue_spec in topology.queues():
        queue = await channel.declare_queue(
            queue_spec.name, durable=True, arguments=queue_spec.arguments
        )
        for binding in queue_spec.bindings:
            await queue.bind(exchanges[binding.exchange], routing_key=binding.routing_key)


async def delete_topology(channel: AbstractChannel, topology: Topology,
                          queue_names: Iterable[str] | None = None) -> None:
    """For tests and teardown: quorum queues refuse ``if_unused``, so both flags are off."""
    for name in queue_names or topology.all_queue_names():
        await channel.queue_delete(name, if_unused=False, if_empty=False)
    for spec in reversed(topology.exchanges()):
        await channel.exchange_delete(spec.name, if_unused=False)
