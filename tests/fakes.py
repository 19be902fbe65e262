"""What the fast tests use instead of RabbitMQ: a delivery that records its acknowledgement, and contexts.

The publisher and the store have in-memory twins in the package itself
(:mod:`authnotify.messaging.memory`, :mod:`authnotify.store.memory`), typed to the same interfaces.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from authnotify.messaging import headers as h
from authnotify.messaging.consumer import MessageContext, message_context
from authnotify.messaging.topology import Consumer


@dataclass
class FakeDelivery:
    """A message as a consumer queue hands it over; ``settled`` says what became of it."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = field(default_factory=lambda: uuid.uuid4().hex)
    routing_key: str | None = None
    redelivered: bool | None = False
    content_type: str | None = h.JSON_CONTENT_TYPE
    content_encoding: str | None = None
    correlation_id: str | None = None
    timestamp: datetime | None = None
    type: str | None = None
    settled: str | None = None  # "ack" or "requeued"
    delivery_tag: int | None = None  # set by a FakeChannel
    channel: FakeChannel | None = None

    async def ack(self, multiple: bool = False) -> None:
        if self.channel is not None:
            self.channel.frames.append(("ack", self.delivery_tag, multiple))
            if multiple:  # as the broker does: every unsettled delivery up to this one
                for delivery in self.channel.deliveries:
                    if delivery.delivery_tag is not None and self.delivery_tag is not None \
                            and delivery.delivery_tag < self.delivery_tag and delivery.settled is None:
                        delivery.settled = "ack"
        assert self.settled is None, f"settled twice: {self.settled}, then ack"
        self.settled = "ack"

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        assert not multiple, "the runtime never nacks several at once"
        if self.channel is not None:
            self.channel.frames.append(("nack", self.delivery_tag, multiple))
        assert self.settled is None, f"settled twice: {self.settled}, then nack"
        self.settled = "requeued" if requeue else "rejected"


@dataclass(eq=False)  # a channel is itself, whatever it holds (and keys the runtime's bookkeeping)
class FakeChannel:
    """Numbers deliveries as a channel does and records the ack and nack frames sent on it."""

    deliveries: list[FakeDelivery] = field(default_factory=list)
    frames: list[tuple[str, int | None, bool]] = field(default_factory=list)
    is_closed: bool = False

    def deliver(self, delivery: FakeDelivery) -> FakeDelivery:
        delivery.delivery_tag = len(self.deliveries) + 1
        delivery.channel = self
        self.deliveries.append(delivery)
        return delivery


def notification_delivery(body: bytes, *, provider: str = "aps", notify_type: str = "TOKEN_CREATED",
                          attempt: int = 1, redelivered: bool = False, **headers: Any) -> FakeDelivery:
    """A notification as the ingress publishes it."""
    return FakeDelivery(body, headers={h.PROVIDER: provider, h.NOTIFY_TYPE: notify_type, h.ATTEMPT: attempt,
                                       **headers},
                        routing_key=f"{provider}.{notify_type}", redelivered=redelivered)


def context_for(consumer: Consumer, *, provider: str = "aps", attempt: int = 1,
                redelivered: bool = False) -> MessageContext:
    """The context a handler gets for a notification of ``provider``."""
    return message_context(consumer, notification_delivery(b"{}", provider=provider, attempt=attempt,
                                                           redelivered=redelivered))
