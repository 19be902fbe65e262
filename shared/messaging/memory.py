"""An in-memory :class:`~authnotify.messaging.publisher.Publisher`, for tests of the logic above it.

It keeps what it was asked to publish, in order, and can be told to refuse (as a broker that is down, or
that nacks): the ingress, the consumer runtime's outcomes and the handlers then run in milliseconds without
RabbitMQ. What only a broker can show (confirms, returns, dead-lettering, redelivery) stays in the tests
that use a real one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from authnotify.errors import PublishFailed
from authnotify.messaging.messages import OutgoingMessage


@dataclass(frozen=True)
class Published:
    message: OutgoingMessage
    exchange: str
    routing_key: str


@dataclass
class InMemoryPublisher:
    published: list[Published] = field(default_factory=list)
    failure: str | None = None  # when set, every publish raises PublishFailed(failure)
    delay_seconds: float = 0.0  # a slow confirm
    ready: bool = True

    async def publish(self, message: OutgoingMessage, *, exchange: str, routing_key: str) -> None:
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if not self.ready:
            raise PublishFailed("broker unavailable")
        if self.failure is not None:
            raise PublishFailed(self.failure)
        self.published.append(Published(message, exchange, routing_key))

    def to(self, routing_key: str) -> list[OutgoingMessage]:
        """What was published with ``routing_key`` (a queue name, for the default exchange)."""
        return [p.message for p in self.published if p.routing_key == routing_key]
