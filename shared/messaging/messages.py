"""Every AMQP message authnotify sends is built here: notifications, merchant events, lifecycle commands,
retries, dead letters.

A message is its body and its AMQP properties (persistent, JSON, an id, our headers), built straight as the
properties aiormq writes: an ``aio_pika.Message`` costs more than the publish it describes on the hot path.
A retry, a dead letter and a replay re-publish what was received, body and id unchanged, with new headers.
A message built while a span is current carries the trace in its headers (``traceparent``; see
:mod:`authnotify.observability.tracing`); a re-published one keeps the trace it had.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson
from aiormq import spec

from authnotify.domain.commands import RefreshRequest, RevokeCommand
from authnotify.domain.events import MerchantEvent
from authnotify.messaging import headers as h
from authnotify.observability.tracing import TRACING, inject_trace


def json_object(body: bytes) -> dict[str, Any] | None:
    """The JSON object a message body holds; None for a body that is not one (not JSON, or an array...)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None

Properties = spec.Basic.Properties
PERSISTENT = 2  # AMQP delivery mode: written to disk by the broker


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    body: bytes
    properties: Properties

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})


class ReceivedMessage(Protocol):
    """What a re-publish needs of a message we received (an aio-pika incoming message has all of it)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Any: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def type(self) -> str | None: ...


def notification_message(body: bytes, *, message_id: str, provider: str, notify_type: str) -> OutgoingMessage:
    """What the ingress publishes: Alipay's raw body, and who sent it when, in the headers."""
    headers: dict[str, Any] = {h.PROVIDER: provider, h.NOTIFY_TYPE: notify_type, h.RECEIVED_AT: h.utc_now_iso(),
                               h.ATTEMPT: 1}
    if TRACING.enabled:
        inject_trace(headers)
    return OutgoingMessage(body, Properties(
        message_id=message_id,
        content_type=h.JSON_CONTENT_TYPE,
        delivery_mode=PERSISTENT,
        headers=headers,
    ))


def event_message(event: MerchantEvent) -> OutgoingMessage:
    """A merchant event for ``{ns}.merchant-events``: its JSON is the webhook body, its id the webhook-id."""
    headers: dict[str, Any] = {h.PROVIDER: event.data.provider, h.NOTIFY_TYPE: event.type, h.ATTEMPT: 1}
    if TRACING.enabled:
        inject_trace(headers)
    return OutgoingMessage(event.to_json(), Properties(
        content_type=h.JSON_CONTENT_TYPE,
        delivery_mode=PERSISTENT,
        headers=headers,
        message_id=event.id,
    ))


def command_message(command: RefreshRequest | RevokeCommand, *, kind: str) -> OutgoingMessage:
    """A lifecycle command for its consumer queue; ``kind`` (the consumer's name) is what ``dlq list`` shows."""
    message_id = command.commandId if isinstance(command, RevokeCommand) else f"rfr_{secrets.token_urlsafe(16)}"
    headers: dict[str, Any] = {h.PROVIDER: command.provider, h.NOTIFY_TYPE: kind, h.RECEIVED_AT: h.utc_now_iso(),
                               h.ATTEMPT: 1}
    if TRACING.enabled:
        inject_trace(headers)
    return OutgoingMessage(command.to_json(), Properties(
        content_type=h.JSON_CONTENT_TYPE,
        delivery_mode=PERSISTENT,
        headers=headers,
        message_id=message_id,
    ))


def copy_with_headers(received: ReceivedMessage, headers: dict[str, Any]) -> OutgoingMessage:
    """The same message (body, id, properties), persistent, with new headers."""
    return OutgoingMessage(received.body, Properties(
        headers=headers,
        content_type=received.content_type or h.JSON_CONTENT_TYPE,
        content_encoding=received.content_encoding,
        message_id=received.message_id,
        correlation_id=received.correlation_id,
        timestamp=received.timestamp,
        message_type=received.type,
        delivery_mode=PERSISTENT,
    ))


def retry_message(received: ReceivedMessage, *, next_attempt: int, reason: str) -> OutgoingMessage:
    headers = dict(received.headers or {})
    headers[h.ATTEMPT] = next_attempt
    headers[h.LAST_ERROR] = reason
    return copy_with_headers(received, headers)


def dead_letter_message(received: ReceivedMessage, *, consumer_name: str, reason: str,
                        attempts: int) -> OutgoingMessage:
    """The message as it rests in a dead-letter queue: unchanged, plus why, after how many tries, when."""
    headers = dict(received.headers or {})
    headers.update({
        h.DEAD_REASON: reason,
        h.DEAD_ATTEMPTS: attempts,
        h.DEAD_QUEUE: consumer_name,
        h.DEAD_AT: h.utc_now_iso(),
    })
    return copy_with_headers(received, headers)


def replay_message(received: ReceivedMessage, death: dict[str, Any]) -> OutgoingMessage:
    """A dead letter sent back to its queue: attempts reset, its death appended to the history."""
    headers = dict(received.headers or {})
    history = headers.get(h.HISTORY)
    history = list(history) if isinstance(history, list) else []
    history.append({key: value for key, value in death.items() if value is not None})
    for name in (*h.DEAD_HEADERS, *h.BROKER_HEADERS):
        headers.pop(name, None)
    headers[h.ATTEMPT] = 1
    headers[h.REPLAYED] = h.header_int(headers, h.REPLAYED, 0) + 1
    headers[h.HISTORY] = history
    return copy_with_headers(received, headers)
