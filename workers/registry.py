"""Which handler each consumer runs: the explicit list. Adding a consumer means a name in
:class:`~authnotify.messaging.topology.Consumer`, a handler module here, and a line below."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from authnotify.messaging.consumer import ConsumerSpec
from authnotify.messaging.topology import Consumer
from authnotify.workers import (
    authcode_created,
    merchant_events,
    revocations,
    token_canceled,
    token_created,
    token_refresh,
)
from authnotify.workers.resources import Resources

BuildConsumer = Callable[[Resources], Awaitable[ConsumerSpec]]

CONSUMERS: dict[Consumer, BuildConsumer] = {
    Consumer.AUTHCODE_CREATED: authcode_created.consumer,
    Consumer.TOKEN_CREATED: token_created.consumer,
    Consumer.TOKEN_CANCELED: token_canceled.consumer,
    Consumer.TOKEN_REFRESH: token_refresh.consumer,
    Consumer.REVOCATIONS: revocations.consumer,
    Consumer.MERCHANT_EVENTS: merchant_events.consumer,
}


async def build_specs(resources: Resources, names: Sequence[str]) -> list[ConsumerSpec]:
    """The consumers named (each once, in order), built on the process's shared resources."""
    return [await CONSUMERS[Consumer(name)](resources) for name in dict.fromkeys(names)]
