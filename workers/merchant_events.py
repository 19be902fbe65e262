"""The ``merchant-events`` consumer: POSTs each event to its merchant, signed per Standard Webhooks.

The ``webhook-id`` is the event's id, the same on every retry and replay, so the merchant
deduplicates on it; ``webhook-timestamp`` is the time of each attempt (verifiers refuse stale timestamps).
A 2xx answer is delivered; any other answer, a timeout or a connection error is transient (retried, then
dead-lettered); an event no registry entry and no default takes is dead-lettered at once. An entry whose
``events`` filter leaves the type out means: not delivered, acknowledged, counted as ``filtered``. A merchant
whose deliveries keep failing has its events held back by its circuit (:mod:`authnotify.workers.merchant_circuit`).
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
from standardwebhooks import Webhook

from authnotify.config import Settings
from authnotify.domain.events import MerchantEvent
from authnotify.domain.merchants import Endpoint, MerchantRegistry, merchant_registry_from_settings
from authnotify.errors import PermanentError, TransientError
from authnotify.messaging.consumer import ConsumerSpec, MessageContext, json_model_parser
from authnotify.messaging.topology import Consumer
from authnotify.observability.logging import annotate, get_logger
from authnotify.observability.metrics import MERCHANT_DELIVERIES, MERCHANT_DELIVERY_SECONDS, NO_MERCHANT
from authnotify.workers.merchant_circuit import DEFAULT_PROBE_INTERVAL_SECONDS, CircuitOpen, MerchantCircuits
from authnotify.workers.resources import Resources

log = get_logger("authnotify.merchant_events")

DELIVERY_TIMEOUT_SECONDS = 15.0
USER_AGENT = "authnotify-webhooks/1"
# Only the status counts; of the body, at most this much is read, and a longer one is not read at all (the
# connection is dropped instead), whatever the merchant sends.
MAX_ANSWER_BYTES = 64 * 1024


async def read_at_most(response: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES) -> int:
    """Reads up to ``limit`` bytes of the answer and returns how many were read; past that the connection is
    closed instead of read (a short answer leaves it reusable)."""
    read = 0
    while read <= limit:
        chunk = await response.content.read(limit + 1 - read)  # whatever has arrived, up to what is left
        if not chunk:
            return read
        read += len(chunk)
    response.close()  # not release(): that would keep reading to the end
    return read


@functools.cache
def _webhooks(endpoint: Endpoint) -> tuple[Webhook, ...]:
    """The entry's signers, made once (each decodes its secret) rather than for every delivery."""
    return endpoint.webhooks


@functools.cache
def _deliveries(merchant: str, outcome: str) -> Any:
    return MERCHANT_DELIVERIES.labels(merchant, outcome)


@functools.cache
def _delivery_seconds(merchant: str) -> Any:
    return MERCHANT_DELIVERY_SECONDS.labels(merchant)


def signed_headers(endpoint: Endpoint, event_id: str, payload: bytes, now: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt: id, whole-second timestamp, and ``v1,<HMAC>`` by each of
    the entry's secrets, space-separated (a merchant rotating its secret verifies with either)."""
    moment = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    text = payload.decode("utf-8")
    signature = " ".join(webhook.sign(event_id, moment, text) for webhook in _webhooks(endpoint))
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def _no_endpoint_reason(event: MerchantEvent) -> str:
    data = event.data
    return (
        f"no merchant endpoint for referenceMerchantId {data.referenceMerchantId!r} or authClientId "
        f"{data.authClientId!r}, and no [merchants.default] in the merchant registry"
    )


async def post_event(endpoint: Endpoint, event: MerchantEvent, http: aiohttp.ClientSession) -> tuple[int, int]:
    """One delivery attempt: the answer's status and the bytes of it read; :class:`TransientError` unless 2xx."""
    payload = event.to_json()
    headers = signed_headers(endpoint, event.id, payload)
    started = time.perf_counter()
    # The URL is never logged or put in a reason: merchants put credentials in query strings.
    try:
        async with http.post(
            endpoint.url,
            data=payload,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_SECONDS),
            allow_redirects=False,  # a redirect is not a delivery; Standard Webhooks senders treat 3xx as failure
        ) as response:
            status = response.status
            answer_bytes = await read_at_most(response)
    except TimeoutError:
        _deliveries(endpoint.name, "failed").inc()
        raise TransientError(
            f"merchant {endpoint.name!r} did not answer within {DELIVERY_TIMEOUT_SECONDS:g} s"
        ) from None
    except aiohttp.ClientError as exc:
        _deliveries(endpoint.name, "failed").inc()
        raise TransientError(f"merchant {endpoint.name!r} unreachable ({type(exc).__name__})") from None
    finally:
        _delivery_seconds(endpoint.name).observe(time.perf_counter() - started)

    if not 200 <= status < 300:
        _deliveries(endpoint.name, "failed").inc()
        raise TransientError(f"merchant {endpoint.name!r} answered HTTP {status}")
    _deliveries(endpoint.name, "delivered").inc()
    return status, answer_bytes


async def handle_merchant_event(
    event: MerchantEvent,
    context: MessageContext,
    *,
    registry: MerchantRegistry,
    http: aiohttp.ClientSession,
    circuits: MerchantCircuits | None = None,
) -> None:
    endpoint = registry.endpoint_for(event.data)
    if endpoint is None:
        _deliveries(NO_MERCHANT, "no_endpoint").inc()
        raise PermanentError(_no_endpoint_reason(event))
    fields = {
        "webhook_id": event.id,
        "event_type": event.type,
        "merchant": endpoint.name,
        "fingerprint": event.data.accessTokenFingerprint,
        "attempt": context.attempt,
    }
    if not endpoint.accepts(event.type):
        _deliveries(endpoint.name, "filtered").inc()
        annotate(delivery="filtered", **fields)
        return
    if circuits is None:
        status, answer_bytes = await post_event(endpoint, event, http)
    else:
        try:
            with circuits.attempt(endpoint.name):
                status, answer_bytes = await post_event(endpoint, event, http)
        except CircuitOpen:
            _deliveries(endpoint.name, "circuit_open").inc()
            raise
    annotate(delivery="delivered", http_status=status, answer_bytes_read=answer_bytes, **fields)


parse_merchant_event = json_model_parser(MerchantEvent, "a merchant event")


def merchant_circuits_from_settings(settings: Settings) -> MerchantCircuits:
    """The process's circuits: a probe at most every shortest merchant-events retry delay."""
    delays = settings.retry_delays_for(Consumer.MERCHANT_EVENTS.value)
    return MerchantCircuits(settings.merchant_circuit_failures,
                            min(delays, default=DEFAULT_PROBE_INTERVAL_SECONDS) or DEFAULT_PROBE_INTERVAL_SECONDS)


async def consumer(resources: Resources) -> ConsumerSpec:
    # Validated before anything is consumed: a bad registry stops the start with one line.
    registry = merchant_registry_from_settings(resources.settings)
    circuits = merchant_circuits_from_settings(resources.settings)
    http = await resources.http()

    async def handle(event: MerchantEvent, context: MessageContext) -> None:
        await handle_merchant_event(event, context, registry=registry, http=http, circuits=circuits)

    return ConsumerSpec(consumer=Consumer.MERCHANT_EVENTS, parse=parse_merchant_event, handle=handle)
