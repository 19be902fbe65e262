"""Which handler each consumer runs, and what it needs of the configuration: the explicit list. Adding a
consumer means a name in :class:`~authnotify.messaging.topology.Consumer`, a handler module here, a line
below, and its ``AUTHNOTIFY_RETRY_DELAYS_<CONSUMER>`` field in the settings."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from authnotify.config import Need
from authnotify.messaging.consumer import ConsumerSpec
from authnotify.messaging.topology import Consumer
from authnotify.workers import authcode_created, merchant_events, token_canceled, token_created
from authnotify.workers.resources import Resources

BuildConsumer = Callable[[Resources], Awaitable[ConsumerSpec]]


@dataclass(frozen=True)
class ConsumerEntry:
    build: BuildConsumer
    # Checked before the process starts (authnotify.config.needs): nothing else is read, so a worker never
    # refuses to start for a secret it does not use.
    needs: frozenset[Need]


STORE = frozenset({Need.DATABASE, Need.TOKEN_KEYS})

CONSUMERS: dict[Consumer, ConsumerEntry] = {
    Consumer.AUTHCODE_CREATED: ConsumerEntry(
        authcode_created.consumer, STORE | {Need.ALIPAY_KEYS, Need.AMS_CUSTOMER_BELONGS_TO}),
    Consumer.TOKEN_CREATED: ConsumerEntry(token_created.consumer, STORE),
    Consumer.TOKEN_CANCELED: ConsumerEntry(token_canceled.consumer, STORE),
    # Delivers events to merchants: no RSA keys, no token keys, no database.
    Consumer.MERCHANT_EVENTS: ConsumerEntry(merchant_events.consumer, frozenset({Need.MERCHANTS_FILE})),
}


def needs_of(names: Iterable[str]) -> frozenset[Need]:
    """What a worker process running these consumers needs (the broker, always)."""
    needs = {Need.BROKER}
    for name in names:
        needs |= CONSUMERS[Consumer(name)].needs
    return frozenset(needs)


async def build_specs(resources: Resources, names: Sequence[str]) -> list[ConsumerSpec]:
    """The consumers named (each once, in order), built on the process's shared resources."""
    return [await CONSUMERS[Consumer(name)].build(resources) for name in dict.fromkeys(names)]
