"""How full each queue is and who consumes it: what ``GET /v1/queues`` and the console's queue page show.

``ready`` and ``consumers`` come from the broker itself, a passive declare of each queue (no extra rights).
AMQP has no way to ask for a queue's unacknowledged messages, so ``unacknowledged`` comes from RabbitMQ's own
Prometheus endpoint (the ``rabbitmq_prometheus`` plugin, port 15692, which needs no credentials):
``/metrics/detailed?vhost=...&family=queue_coarse_metrics`` on each node (a node reports the queues it
leads, so a cluster's nodes are all asked and their answers merged). Where that endpoint cannot be reached,
``unacknowledged`` is ``None`` (docs/operations.md). A TLS-only broker serves it on 15691 over HTTPS: the URL
may then name the CA to trust, ``https://node:15691?cafile=/path/ca.crt``, as an ``amqps://`` URL does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection
from prometheus_client.parser import text_string_to_metric_families

from authnotify.errors import ConfigError
from authnotify.messaging.topology import Consumer, Topology
from authnotify.observability.logging import get_logger

log = get_logger("authnotify.queues")

QueueKind = Literal["consumer", "retry", "dead-letter", "unrouted"]
UNACKED_METRIC = "rabbitmq_detailed_queue_messages_unacked"
METRICS_TIMEOUT_SECONDS = 2.0
METRICS_RETRY_AFTER_SECONDS = 30.0  # an endpoint that failed is not asked again before this


@dataclass(frozen=True)
class QueueStats:
    name: str
    consumer: str | None  # the consumer it belongs to; None for the unrouted queue
    kind: QueueKind
    ready: int | None  # None: the queue does not exist (yet)
    unacknowledged: int | None  # None: unknown (RabbitMQ's Prometheus endpoint not reachable)
    consumers: int | None


def _queues(topology: Topology) -> list[tuple[str, str | None, QueueKind]]:
    listed: list[tuple[str, str | None, QueueKind]] = []
    for consumer in Consumer:
        listed.append((topology.consumer_queue(consumer), consumer.value, "consumer"))
        listed += [(step.queue, consumer.value, "retry") for step in topology.retry_steps(consumer)]
        listed.append((topology.dead_letter_queue(consumer), consumer.value, "dead-letter"))
    listed.append((topology.unrouted_queue, None, "unrouted"))
    return listed


class BrokerMetrics:
    """Unacknowledged messages per queue, from RabbitMQ's Prometheus endpoint on each of ``urls``."""

    def __init__(self, urls: Sequence[str], vhost: str) -> None:
        self._tls: dict[str, ssl.SSLContext] = {}
        self.urls = tuple(self._endpoint(url) for url in urls)
        self.vhost = vhost
        self._failed_at: dict[str, float] = {}

    def _endpoint(self, url: str) -> str:
        """The URL without its ``cafile``; an https URL gets a context trusting that CA (else the system's)."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        cafile = dict(query).get("cafile")
        endpoint = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "cafile"])))
        endpoint = endpoint.rstrip("/")
        if parts.scheme == "https":
            try:
                self._tls[endpoint] = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as exc:
                reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
                raise ConfigError(f"AUTHNOTIFY_RABBITMQ_METRICS_URLS: cannot use the CA file {cafile} ({reason})") from None
        return endpoint

    async def unacknowledged(self) -> dict[str, int] | None:
        """Queue name -> unacknowledged messages, merged over the nodes that answered; None when none did."""
        now = time.monotonic()
        asked = [url for url in self.urls if now - self._failed_at.get(url, -METRICS_RETRY_AFTER_SECONDS)
                 >= METRICS_RETRY_AFTER_SECONDS]
        if not asked:
            return None
        timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            answers = await asyncio.gather(*(self._scrape(session, url) for url in asked))
        merged: dict[str, int] | None = None
        for answer in answers:
            if answer is None:
                continue
            merged = merged or {}
            for queue, count in answer.items():
                merged[queue] = max(count, merged.get(queue, 0))
        return merged

    async def _scrape(self, session: aiohttp.ClientSession, url: str) -> dict[str, int] | None:
        params = {"vhost": self.vhost, "family": "queue_coarse_metrics"}
        try:
            async with session.get(f"{url}/metrics/detailed", params=params, ssl=self._tls.get(url, True)) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                text = await response.text()
            counts: dict[str, int] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == UNACKED_METRIC and sample.labels.get("vhost", self.vhost) == self.vhost:
                        counts[sample.labels["queue"]] = int(sample.value)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            self._failed_at[url] = time.monotonic()
            log.info("broker_metrics_unavailable", url=url, error=type(exc).__name__,
                     retry_in=METRICS_RETRY_AFTER_SECONDS)
            return None
        self._failed_at.pop(url, None)
        return counts


async def queue_stats(connection: AbstractConnection, topology: Topology,
                      metrics: BrokerMetrics | None = None) -> list[QueueStats]:
    """Every queue of the namespace: consumer queues, their retry and dead-letter queues, then unrouted."""
    unacked_task = asyncio.ensure_future(metrics.unacknowledged()) if metrics is not None else None
    stats: list[QueueStats] = []
    channel: AbstractChannel | None = None
    try:
        for name, consumer, kind in _queues(topology):
            if channel is None or channel.is_closed:
                channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:  # it closed the channel; the next one reopens
                stats.append(QueueStats(name, consumer, kind, None, None, None))
                continue
            result = queue.declaration_result
            stats.append(QueueStats(name, consumer, kind, result.message_count or 0, None, result.consumer_count or 0))
    finally:
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
        unacked = await unacked_task if unacked_task is not None else None
    if unacked is None:
        return stats
    return [QueueStats(s.name, s.consumer, s.kind, s.ready, unacked.get(s.name) if s.ready is not None else None,
                       s.consumers) for s in stats]
