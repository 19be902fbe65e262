"""The AMQP message properties and headers authnotify reads and writes (its own design, not the contract).

The body of a notification message is always the raw request body Alipay sent, byte for byte; everything
else about a message travels in these headers so retries, dead-lettering and replay never touch the body.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

PROVIDER = "authnotify-provider"  # "ams" or "aps"
NOTIFY_TYPE = "authnotify-notify-type"  # authorizationNotifyType, or "unknown"; event type for events
RECEIVED_AT = "authnotify-received-at"  # when the ingress took the notification (ISO 8601)
ATTEMPT = "authnotify-attempt"  # 1 for the first delivery; incremented by each retry
LAST_ERROR = "authnotify-last-error"  # why the previous attempt failed
DEAD_REASON = "authnotify-dead-reason"
DEAD_ATTEMPTS = "authnotify-dead-attempts"
DEAD_QUEUE = "authnotify-dead-queue"  # consumer name the message died in
DEAD_AT = "authnotify-dead-at"
HISTORY = "authnotify-history"  # earlier deaths, oldest first: [{reason, attempts, queue, at}]
REPLAYED = "authnotify-replayed"  # number of times an operator replayed it

JSON_CONTENT_TYPE = "application/json"


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def header_int(headers: dict[str, Any] | None, name: str, default: int = 0) -> int:
    value = (headers or {}).get(name)
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def header_str(headers: dict[str, Any] | None, name: str) -> str | None:
    value = (headers or {}).get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def copy_with_headers(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    """The same message (body, id, properties), persistent, with new headers: how a retry, a dead letter
    and a replay re-publish what they received."""
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type or JSON_CONTENT_TYPE,
        content_encoding=message.content_encoding,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        type=message.type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
