"""The dead-letter queues and the queues' figures, for the internal API and the console: listing and replaying
through :class:`~authnotify.messaging.deadletters.DeadLetterQueues` (what ``authnotify dlq`` runs) on the
process's own broker connection, and counting with :func:`~authnotify.messaging.queue_stats.queue_stats`.

The filters of a request are read here once, for the API's JSON and the console's forms alike: a bad value
is :class:`~authnotify.operations.authorizations.InvalidRequest` naming the parameter.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq.exceptions

from authnotify.config.values import parse_instant
from authnotify.errors import BrokerUnavailable
from authnotify.messaging.connection import Broker
from authnotify.messaging.deadletters import DeadLetter, DeadLetterFilter, DeadLetterQueues, Selection
from authnotify.messaging.queue_stats import BrokerMetrics, QueueStats, queue_stats
from authnotify.messaging.topology import CONSUMER_NAMES, Consumer, Topology
from authnotify.operations.authorizations import InvalidRequest

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
MAX_REPLAY_IDS = 1000
OPERATION_TIMEOUT_SECONDS = 60.0
MERCHANT_MAX_LENGTH = 128
REASON_MAX_LENGTH = 256


def consumer_names(values: Sequence[str], *, parameter: str = "queue") -> list[str]:
    """Consumer names as given (none: every queue); InvalidRequest for one that is not a consumer."""
    for value in values:
        if value not in CONSUMER_NAMES:
            raise InvalidRequest(f"{parameter}: {value!r} is not a consumer ({', '.join(CONSUMER_NAMES)})")
    return list(dict.fromkeys(values))


def dead_letter_filter(*, merchant: str | None = None, since: str | None = None,
                       reason: str | None = None) -> DeadLetterFilter:
    """The filter of a request's ``merchant``, ``since`` (ISO 8601) and ``reason``; empty values are absent."""
    if merchant and len(merchant) > MERCHANT_MAX_LENGTH:
        raise InvalidRequest(f"merchant: at most {MERCHANT_MAX_LENGTH} characters")
    if reason and len(reason) > REASON_MAX_LENGTH:
        raise InvalidRequest(f"reason: at most {REASON_MAX_LENGTH} characters")
    moment = None
    if since:
        try:
            moment = parse_instant(since)
        except ValueError as exc:
            raise InvalidRequest(f"since: {exc}") from None
    return DeadLetterFilter(merchant=merchant or None, since=moment, reason=reason or None)


def list_limit(value: str | None) -> int:
    if not value:
        return DEFAULT_LIST_LIMIT
    try:
        limit = int(value)
    except ValueError:
        raise InvalidRequest("limit: a whole number") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequest(f"limit: 1 to {MAX_LIST_LIMIT}")
    return limit


@dataclass(frozen=True)
class Listing:
    items: list[DeadLetter]
    more: bool  # more match than the limit let through


@dataclass(frozen=True)
class Replayed:
    items: list[DeadLetter]
    not_found: list[str]  # asked-for ids that were not (or no longer) in the dead-letter queue


class OperatorQueues:
    """Dead letters and queue figures on a process's :class:`Broker` connection.

    One operation at a time per process: a listing holds the messages it reads until it closes its channel,
    so two at once would each see only part of a queue.
    """

    def __init__(self, broker: Broker, topology: Topology, metrics: BrokerMetrics | None = None) -> None:
        self.broker = broker
        self.topology = topology
        self.metrics = metrics
        self._one_at_a_time = asyncio.Lock()

    def _queues(self) -> DeadLetterQueues:
        connection = self.broker.connection
        if connection is None or not self.broker.is_open:
            raise BrokerUnavailable("broker unavailable")
        return DeadLetterQueues(connection, self.topology)

    async def _run(self, operation: str, work: Any) -> Any:
        try:
            async with self._one_at_a_time, asyncio.timeout(OPERATION_TIMEOUT_SECONDS):
                return await work(self._queues())
        except TimeoutError:
            raise BrokerUnavailable(f"{operation}: no answer from the broker within "
                                    f"{OPERATION_TIMEOUT_SECONDS:.0f} s") from None
        except (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise BrokerUnavailable(f"{operation}: broker connection lost ({type(exc).__name__})") from None

    async def list(self, names: Sequence[str], filter: DeadLetterFilter, limit: int) -> Listing:
        selection = Selection(limit=limit + 1, filter=filter)  # one more than shown: is there more?

        async def work(queues: DeadLetterQueues) -> list[DeadLetter]:
            return await queues.list(names, selection)

        items: list[DeadLetter] = await self._run("dlq list", work)
        return Listing(items[:limit], more=len(items) > limit)

    async def replay(self, queue: str, *, ids: Sequence[str] = (), filter: DeadLetterFilter | None = None,
                     limit: int | None = None) -> Replayed:
        """Moves the chosen dead letters of ``queue`` back, each confirmed before it is removed."""
        selection = Selection(ids, limit, filter)

        async def work(queues: DeadLetterQueues) -> builtins.list[DeadLetter]:
            return await queues.replay([Consumer(queue).value], selection)

        items: builtins.list[DeadLetter] = await self._run("dlq replay", work)
        return Replayed(items, sorted(set(ids) - {letter.id for letter in items}))

    async def stats(self) -> builtins.list[QueueStats]:
        connection = self.broker.connection
        if connection is None or not self.broker.is_open:
            raise BrokerUnavailable("broker unavailable")
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT_SECONDS):
                return await queue_stats(connection, self.topology, self.metrics)
        except TimeoutError:
            raise BrokerUnavailable("queues: no answer from the broker") from None
        except (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise BrokerUnavailable(f"queues: broker connection lost ({type(exc).__name__})") from None
