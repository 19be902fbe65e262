"""The AMQP headers authnotify reads and writes on its messages (its own design, internal; docs/queues.md).

The body of a notification message is always the raw request body Alipay sent, byte for byte; everything
else about a message travels in these headers so retries, dead-lettering and replay never touch the body.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

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

# What the broker adds when it dead-letters or redelivers; a replayed message starts clean of them.
BROKER_HEADERS = ("x-death", "x-delivery-count", "x-first-death-exchange", "x-first-death-queue",
                  "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")
DEAD_HEADERS = (DEAD_REASON, DEAD_ATTEMPTS, DEAD_QUEUE, DEAD_AT, LAST_ERROR)

JSON_CONTENT_TYPE = "application/json"

_formatted_second = -1
_formatted_prefix = ""


def utc_now_iso() -> str:
    """Now as ISO 8601 UTC with milliseconds and "Z"; the date and time are formatted once a second (the
    ingress stamps every notification with it)."""
    global _formatted_second, _formatted_prefix
    now = time.time()
    second = int(now)
    if second != _formatted_second:
        _formatted_prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _formatted_second = second
    return f"{_formatted_prefix}{int((now - second) * 1000):03d}Z"


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
