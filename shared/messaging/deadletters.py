"""The dead-letter queues, operated safely: list without consuming, replay with confirms, purge.

Reading a dead-letter queue without consuming it: AMQP has no "peek", so each queue is read with
``basic.get`` and manual acknowledgement, at most as many messages as the queue held when we looked, and
nothing is acked; closing the channel then gives every message back to the broker, which keeps their order
(the redelivered flag is set, which the DLQ does not care about). Replay publishes each chosen message to
its consumer queue through the confirmed publisher and acks it in the DLQ only after the confirm, so a
replay interrupted at any point leaves every message in the DLQ, in the consumer queue, or (at worst,
between the confirm and the ack) in both; the handlers are idempotent. Messages not chosen are never acked.

A listing or a replay can be narrowed by :class:`DeadLetterFilter` (merchant, dead-lettered since, reason),
the one filter the command line (``authnotify dlq list|replay --merchant --since --reason``) and the
internal API (``GET /v1/dlq``, ``POST /v1/dlq/replay``) both use. The command line prints what these return;
the API answers it.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from authnotify.errors import CommandError
from authnotify.messaging import headers as h
from authnotify.messaging.connection import Broker, command_connection
from authnotify.messaging.messages import json_object, replay_message
from authnotify.messaging.publisher import ConfirmedPublisher
from authnotify.messaging.topology import Consumer, Topology

GET_TIMEOUT_SECONDS = 10
PUBLISH_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message as ``dlq list --json`` shows it."""

    id: str
    queue: str
    provider: str | None
    notifyType: str | None
    attempts: int | None
    reason: str | None
    deadLetteredAt: str | None
    merchant: str | None  # referenceMerchantId, else authClientId, from the body; None when it names neither


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _broker_death(headers: dict[str, Any]) -> dict[str, Any] | None:
    """The broker's own dead-lettering (quorum delivery limit, a reject) from the x-death list, newest first.

    Retries pass through delay queues that dead-letter by TTL ("expired"): those entries are not deaths.
    """
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths:
        return None
    for entry in deaths:
        if isinstance(entry, dict) and _iso(entry.get("reason")) != "expired":
            return entry
    return None


def death_of(message: AbstractIncomingMessage, consumer: Consumer) -> dict[str, Any]:
    """{reason, attempts, queue, at} of the death that put the message in its DLQ (our runtime or the broker)."""
    headers = dict(message.headers or {})
    if h.DEAD_REASON in headers:
        return {
            "reason": h.header_str(headers, h.DEAD_REASON),
            "attempts": h.header_int(headers, h.DEAD_ATTEMPTS, h.header_int(headers, h.ATTEMPT, 1)),
            "queue": h.header_str(headers, h.DEAD_QUEUE) or consumer.value,
            "at": h.header_str(headers, h.DEAD_AT),
        }
    entry = _broker_death(headers) or {}
    reason = _iso(entry.get("reason")) or "delivery_limit"
    attempts = max(h.header_int(headers, "x-delivery-count", 0), h.header_int(entry, "count", 0),
                   h.header_int(headers, h.ATTEMPT, 1))
    return {"reason": reason, "attempts": attempts, "queue": consumer.value, "at": _iso(entry.get("time"))}


def message_key(message: AbstractIncomingMessage) -> str:
    """The message id the ingress gave it; stable however often the message is looked at."""
    if message.message_id:
        return message.message_id
    return "sha256:" + hashlib.sha256(message.body).hexdigest()[:32]


MERCHANT_FIELDS = ("referenceMerchantId", "authClientId")  # in this order, as the merchant registry matches


def merchant_of(body: bytes) -> str | None:
    """The merchant a message is about: its ``referenceMerchantId``, else its ``authClientId`` (a merchant
    event's from its ``data``). None for a body that names neither (a lifecycle command, a body that is not
    JSON): dead letters are shown whatever they hold."""
    document = json_object(body)
    if document is None:
        return None
    data = document.get("data")
    fields = data if isinstance(data, dict) else document
    for name in MERCHANT_FIELDS:
        value = fields.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def describe(message: AbstractIncomingMessage, consumer: Consumer) -> DeadLetter:
    headers = dict(message.headers or {})
    death = death_of(message, consumer)
    return DeadLetter(
        id=message_key(message),
        queue=consumer.value,
        provider=h.header_str(headers, h.PROVIDER),
        notifyType=h.header_str(headers, h.NOTIFY_TYPE),
        attempts=death["attempts"],
        reason=death["reason"],
        deadLetteredAt=death["at"],
        merchant=merchant_of(message.body),
    )


def _moment(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters an operator means (docs/operations.md): all the given conditions hold.

    ``merchant`` equals the message's merchant (:func:`merchant_of`); ``since`` keeps those dead-lettered at
    or after it (a dead letter whose time is unknown is left out); ``reason`` is a case-insensitive substring
    of the reason.
    """

    merchant: str | None = None
    since: datetime | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.since.tzinfo is None:
            raise ValueError("since must carry its offset (or be UTC)")

    @property
    def empty(self) -> bool:
        return self.merchant is None and self.since is None and not self.reason

    def matches(self, letter: DeadLetter) -> bool:
        if self.merchant is not None and letter.merchant != self.merchant:
            return False
        if self.since is not None:
            died = _moment(letter.deadLetteredAt)
            if died is None or died < self.since:
                return False
        return not self.reason or self.reason.casefold() in (letter.reason or "").casefold()


class Selection:
    """Which messages an operation takes: by id (none: all), matching the filter, and at most ``limit``."""

    def __init__(self, ids: Iterable[str] = (), limit: int | None = None,
                 filter: DeadLetterFilter | None = None) -> None:
        self.ids = set(ids)
        self.limit = limit
        self.filter = filter or DeadLetterFilter()
        self.taken = 0

    def wants(self, letter: DeadLetter) -> bool:
        if self.limit is not None and self.taken >= self.limit:
            return False
        return (not self.ids or letter.id in self.ids) and self.filter.matches(letter)

    @property
    def full(self) -> bool:
        return self.limit is not None and self.taken >= self.limit


# Progress reporting: called with (consumer, messages in its DLQ) once, then with (consumer, None) per message.
Progress = Callable[[Consumer, int | None], None]


def _no_progress(_consumer: Consumer, _total: int | None) -> None:
    pass


class DeadLetterQueues:
    """The namespace's dead-letter queues on one plain connection (a command's: it fails fast)."""

    def __init__(self, connection: AbstractConnection, topology: Topology) -> None:
        self._connection = connection
        self.topology = topology

    @classmethod
    @asynccontextmanager
    async def open(cls, rabbitmq_url: str, topology: Topology, *,
                   operation: str = "dlq") -> AsyncIterator[DeadLetterQueues]:
        """The queues on a command's connection; a connection lost meanwhile is one line naming ``operation``
        (whatever was replayed before it is confirmed; the rest is still in its dead-letter queue)."""
        try:
            async with command_connection(rabbitmq_url, topology) as connection:
                yield cls(connection, topology)
        except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
            raise CommandError(f"authnotify: broker connection lost during {operation} "
                               f"({type(exc).__name__})") from None

    @staticmethod
    def consumers(names: Iterable[str]) -> builtins.list[Consumer]:
        chosen = [Consumer(name) for name in dict.fromkeys(names)]
        return chosen or list(Consumer)

    async def _held_messages(self, channel: AbstractChannel, queue_name: str) -> AsyncIterator[AbstractIncomingMessage]:
        """Every message the queue holds now, fetched unacked: closing the channel gives them all back in order."""
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count or 0
        for _ in range(count):
            message = await queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT_SECONDS)
            if message is None:
                return
            yield message

    @staticmethod
    async def _depth(channel: AbstractChannel, queue_name: str) -> int:
        queue = await channel.declare_queue(queue_name, passive=True)
        return queue.declaration_result.message_count or 0

    async def list(self, names: Iterable[str], selection: Selection | None = None) -> builtins.list[DeadLetter]:
        """The dead letters of the named queues (none: all), in order; ``selection`` narrows and bounds it."""
        selection = selection or Selection()
        found: builtins.list[DeadLetter] = []
        for consumer in self.consumers(names):
            if selection.full:
                break
            channel = await self._connection.channel()
            try:
                async for message in self._held_messages(channel, self.topology.dead_letter_queue(consumer)):
                    letter = describe(message, consumer)
                    if selection.wants(letter):
                        selection.taken += 1
                        found.append(letter)
                        if selection.full:
                            break
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()  # nothing acked: every message goes back, in order
        return found

    async def replay(self, names: Iterable[str], selection: Selection, *, dry_run: bool = False,
                     progress: Progress = _no_progress) -> builtins.list[DeadLetter]:
        """Moves the chosen messages back to their consumer queues; returns what was (or would be) replayed."""
        replayed: builtins.list[DeadLetter] = []
        broker = Broker.on_connection(self._connection, self.topology)
        publisher = ConfirmedPublisher(broker, name="dlq-replay", confirm_timeout=PUBLISH_TIMEOUT_SECONDS)
        try:
            if not dry_run:
                await publisher.wait_ready(PUBLISH_TIMEOUT_SECONDS)
            for consumer in self.consumers(names):
                if selection.full:
                    break
                dlq = self.topology.dead_letter_queue(consumer)
                channel = await self._connection.channel()
                try:
                    progress(consumer, await self._depth(channel, dlq))
                    async for message in self._held_messages(channel, dlq):
                        progress(consumer, None)
                        letter = describe(message, consumer)
                        if not selection.wants(letter):
                            continue  # left unacked: back in the DLQ, in place, when the channel closes
                        selection.taken += 1
                        replayed.append(letter)
                        if dry_run:
                            continue
                        await publisher.publish(replay_message(message, death_of(message, consumer)),
                                                exchange="", routing_key=self.topology.consumer_queue(consumer))
                        await message.ack()  # only now: the copy in the consumer queue is confirmed
                        if selection.full:
                            break
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
        finally:
            await publisher.close()
        return replayed

    async def purge(self, names: Iterable[str], selection: Selection, *,
                    progress: Progress = _no_progress) -> int:
        purged = 0
        for consumer in self.consumers(names):
            dlq = self.topology.dead_letter_queue(consumer)
            channel = await self._connection.channel()
            try:
                if not selection.ids:
                    queue = await channel.declare_queue(dlq, passive=True)
                    result = await queue.purge()
                    purged += result.message_count or 0
                    continue
                progress(consumer, await self._depth(channel, dlq))
                async for message in self._held_messages(channel, dlq):
                    progress(consumer, None)
                    if selection.wants(describe(message, consumer)):
                        await message.ack()
                        purged += 1
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        return purged
