"""Helpers for the worker tests: run consumers in this process, publish like the ingress, read queues.

Everything talks to the real broker in the test's namespace; waits poll with a deadline, never sleep blind.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from shared import messages as h
from shared.config import Settings
from shared.events import MerchantEvent
from shared.topology import build_topology, declare_topology, event_routing_key, notification_routing_key
from workers.main import build_specs
from workers.resources import Resources
from workers.runtime import WorkerRuntime

T = TypeVar("T")


@asynccontextmanager
async def running_workers(settings: Settings, *names: str) -> AsyncIterator[WorkerRuntime]:
    """The named consumers, on the real broker, until the block ends (then drained and stopped)."""
    resources = Resources(settings)
    try:
        specs = await build_specs(resources, names)
        runtime = WorkerRuntime(settings, specs, http_port=0)
        await runtime.start()
        try:
            await runtime.wait_ready(20)
            yield runtime
        finally:
            await runtime.stop()
    finally:
        await resources.aclose()


async def declare(channel: AbstractChannel, settings: Settings) -> None:
    await declare_topology(channel, build_topology(settings))


async def publish_notification(
    channel: AbstractChannel,
    settings: Settings,
    provider: str,
    body: dict[str, Any] | bytes,
    *,
    message_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> str:
    """Publishes a notification exactly as the ingress does (confirmed, persistent, same headers)."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    notify_type = None
    if isinstance(body, dict):
        notify_type = body.get("authorizationNotifyType")
    message_id = message_id or uuid.uuid4().hex
    exchange = await channel.get_exchange(build_topology(settings).notifications_exchange)
    await exchange.publish(
        aio_pika.Message(
            body=raw,
            message_id=message_id,
            content_type=h.JSON_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={
                h.PROVIDER: provider,
                h.NOTIFY_TYPE: notify_type if isinstance(notify_type, str) else "unknown",
                h.RECEIVED_AT: h.utc_now_iso(),
                h.ATTEMPT: 1,
                **(headers or {}),
            },
        ),
        routing_key=notification_routing_key(provider, notify_type if isinstance(notify_type, str) else None),
    )
    return message_id


async def publish_event(channel: AbstractChannel, settings: Settings, event: MerchantEvent,
                        headers: dict[str, Any] | None = None) -> None:
    """Publishes a merchant event as the runtime does after a handler returned it."""
    exchange = await channel.get_exchange(build_topology(settings).notifications_exchange)
    await exchange.publish(
        aio_pika.Message(
            body=event.to_json(),
            message_id=event.id,
            content_type=h.JSON_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={h.PROVIDER: event.data.provider, h.NOTIFY_TYPE: event.type, h.ATTEMPT: 1, **(headers or {})},
        ),
        routing_key=event_routing_key(event.type),
    )


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 15.0,
                     interval: float = 0.05, what: str = "condition") -> T:
    """Polls ``check`` until it returns something truthy; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def take_messages(channel: AbstractChannel, queue_name: str, count: int,
                        timeout: float = 15.0) -> list[AbstractIncomingMessage]:
    """Takes (gets and acks) ``count`` messages from a queue, waiting for them to arrive."""
    queue = await channel.get_queue(queue_name, ensure=False)
    taken: list[AbstractIncomingMessage] = []

    async def more() -> bool:
        while len(taken) < count:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                return False
            taken.append(message)
        return True

    await eventually(more, timeout, what=f"{count} messages in {queue_name} (got {len(taken)})")
    return taken


async def take_all(channel: AbstractChannel, queue_name: str) -> list[AbstractIncomingMessage]:
    """Takes what the queue holds right now."""
    queue = await channel.get_queue(queue_name, ensure=False)
    taken: list[AbstractIncomingMessage] = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(message)
    return taken


async def queue_depth(channel: AbstractChannel, queue_name: str) -> int:
    declared = await channel.declare_queue(queue_name, passive=True)
    return declared.declaration_result.message_count or 0


def metric(name: str, **labels: str) -> float:
    """The current value of a Prometheus sample in this process (0 when never touched)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def events_of(messages: list[AbstractIncomingMessage]) -> list[MerchantEvent]:
    return [MerchantEvent.model_validate_json(m.body) for m in messages]
