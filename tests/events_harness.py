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

from authnotify.config import Settings
from authnotify.domain.events import MerchantEvent
from authnotify.messaging import headers as h
from authnotify.messaging.topology import build_topology, declare_topology, event_routing_key, notification_routing_key
from authnotify.workers.process import Workers
from authnotify.workers.registry import build_specs
from authnotify.workers.resources import Resources

T = TypeVar("T")


@asynccontextmanager
async def running_workers(settings: Settings, *names: str) -> AsyncIterator[Workers]:
    """The named consumers, on the real broker, until the block ends (then drained and stopped)."""
    resources = Resources(settings)
    try:
        specs = await build_specs(resources, names)
        runtime = Workers(settings, specs, http_port=0)
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


# --- databases and notifications -------------------------------------------------------------------


def new_token_key() -> str:
    """An AUTHNOTIFY_TOKEN_KEYS value (a subprocess needs the text, not TokenKeys)."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def aps_token_created(access_token: str, **fields: Any) -> dict[str, Any]:
    """Alipay+'s documented TOKEN_CREATED sample, with the given tokens and overrides (None removes a field)."""
    body: dict[str, Any] = {
        "authorizationNotifyType": "TOKEN_CREATED",
        "authClientId": "218823863726123456789",
        "referenceMerchantId": "218823863726123456780",
        "referenceAgreementId": f"agr-{access_token[-12:]}",
        "accessToken": access_token,
        "accessTokenExpiryTime": "2022-06-06T12:12:12+08:00",
        "refreshToken": f"refresh-{access_token}",
        "refreshTokenExpiryTime": "2022-06-08T12:12:12+08:00",
        "scopes": ["AGREEMENT_PAY", "USER_LOGIN_ID"],
        "customerId": "278980891234567891234567891",
        "userLoginId": "62-34312736",
        "acquirerId": "1021234567891230001",
        "pspId": "1021234567891230002",
        "walletForAccountBinding": {
            "walletName": "AlipayCN",
            "walletBrandName": "AlipayCN",
            "walletLogo": {"logoName": "AlipayCN", "logoUrl": "https://www.alipayplus.com/logo/2002.png"},
        },
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def aps_token_canceled(access_token: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "authorizationNotifyType": "TOKEN_CANCELED",
        "authClientId": "218823863726123456789",
        "referenceMerchantId": "218823863726123456780",
        "accessToken": access_token,
        "tokenCancelSource": "PSP",
        "reason": "user unbound the wallet",
        "acquirerId": "1021234567891230001",
        "pspId": "1021234567891230002",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


AMS_RESULT = {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"}


def ams_token_created(access_token: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "authorizationNotifyType": "TOKEN_CREATED",
        "authClientId": "2188120000001234",
        "accessToken": access_token,
        "authState": "663A8FA9-D836-48EE-8AA1-1FF682989DC7",
        "userLoginId": "alice***@example.com",
        "userId": "2088102000000001",
        "result": AMS_RESULT,
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def ams_token_canceled(access_token: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "authorizationNotifyType": "TOKEN_CANCELED",
        "authClientId": "2188120000001234",
        "accessToken": access_token,
        "reason": "user canceled in the wallet",
        "result": AMS_RESULT,
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}
