"""The HTTP ingress (Alipay's notify paths): check, publish with confirms, and only then answer SUCCESS.

Checks run in this order (provider configured, method, content type, size, Client-Id, signature; then the
in-flight limit) and a request that fails one publishes nothing (docs/ingress.md). An accepted body is
published unchanged; its ``authorizationNotifyType`` only picks the routing key (anything unreadable goes to
``{provider}.unknown``, kept in ``{ns}.unrouted``). The answers and their HTTP statuses are in
:mod:`authnotify.ingress.answers`.
"""

from __future__ import annotations

from random import getrandbits
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_exceptions import HTTPRequestEntityTooLarge

from authnotify.alipay.notifications import NOTIFY_PATHS
from authnotify.alipay.signature import verify_signature_header
from authnotify.config import PROVIDERS, ProviderConfig, Settings
from authnotify.errors import PublishFailed
from authnotify.ingress.answers import (
    INVALID_CLIENT,
    INVALID_SIGNATURE,
    MEDIA_TYPE_NOT_ACCEPTABLE,
    METHOD_NOT_SUPPORTED,
    NO_INTERFACE_DEF,
    PARAM_ILLEGAL,
    REQUEST_TRAFFIC_EXCEED_LIMIT,
    SUCCESS,
    UNKNOWN_EXCEPTION,
    UNSIGNED_HEADERS,
    AnswerSigner,
    Outcome,
)
from authnotify.messaging.connection import Broker
from authnotify.messaging.health import add_health_routes
from authnotify.messaging.messages import notification_message
from authnotify.messaging.publisher import ConfirmedPublisher, Publisher
from authnotify.messaging.topology import build_topology, notification_routing_key
from authnotify.observability.logging import get_logger
from authnotify.observability.metrics import BROKER_CONNECTED, INGRESS_INFLIGHT, NOTIFICATIONS_RECEIVED

log = get_logger("authnotify.ingress")

MAX_BODY_BYTES = 64 * 1024
# Alipay+ gives up on an answer after 5 s and no answer may take longer: the confirm wait leaves room for
# reading the request and writing the answer.
CONFIRM_TIMEOUT_SECONDS = 4.5

class InflightLimit:
    """Publishes awaiting a confirm; beyond ``maximum`` the ingress answers 429 instead of queueing."""

    __slots__ = ("maximum", "current")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.current = 0

    def try_acquire(self) -> bool:
        if self.current >= self.maximum:
            return False
        self.current += 1
        return True

    def release(self) -> None:
        self.current -= 1


PUBLISHER_KEY = web.AppKey("publisher", Publisher)
INFLIGHT_KEY = web.AppKey("inflight", InflightLimit)


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_message_id() -> str:
    """A random (version 4) UUID as 32 hex digits; uuid.uuid4() costs a getrandom syscall per call."""
    return f"{(getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET:032x}"


def _notify_type(body: bytes) -> str | None:
    """authorizationNotifyType of a JSON object body; None for anything else (routed as unknown)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    notify_type = document.get("authorizationNotifyType")
    return notify_type if isinstance(notify_type, str) else None


class NotificationEndpoint:
    """One provider's notify path; ``config`` is None when the provider is off (no client id)."""

    def __init__(self, provider: str, path: str, config: ProviderConfig | None, publisher: Publisher,
                 exchange: str, inflight: InflightLimit) -> None:
        self.provider = provider
        self.path = path
        self._config = config
        self._publisher = publisher
        self._exchange = exchange
        self._inflight = inflight
        self._signer = AnswerSigner(config.client_id, config.private_key) if config else None
        self._received: dict[str, Any] = {}  # resolved metric children: labels() costs a lock per call
        # A concrete logger: the lazy proxy get_logger returns rebuilds one on every call (~70 µs).
        self._log = log.bind()

    def _answer(self, outcome: Outcome, message_id: str, reason: str | None = None,
                routing_key: str | None = None, error: BaseException | None = None) -> web.Response:
        counter = self._received.get(outcome.code)
        if counter is None:
            counter = self._received[outcome.code] = NOTIFICATIONS_RECEIVED.labels(self.provider, outcome.code)
        counter.inc()
        if outcome is SUCCESS:
            self._log.info("notification", message_id=message_id, provider=self.provider,
                           outcome=outcome.code, routing_key=routing_key)
        else:
            self._log.warning("notification", message_id=message_id, provider=self.provider,
                              outcome=outcome.code, http_status=outcome.http_status, reason=reason, exc_info=error)
        headers = self._signer.headers(self.path, outcome) if self._signer else UNSIGNED_HEADERS
        return web.Response(body=outcome.body, status=outcome.http_status, headers=headers)

    async def handle(self, request: web.Request) -> web.Response:
        # Every request gets the id its message would carry, so each log line names one.
        message_id = new_message_id()
        try:
            return await self._check_and_publish(request, message_id)
        except Exception as exc:  # a bug or a dropped client: answer U (Alipay retries), never a bare 500
            return self._answer(UNKNOWN_EXCEPTION, message_id, f"unexpected {type(exc).__name__}", error=exc)

    async def _check_and_publish(self, request: web.Request, message_id: str) -> web.Response:
        config = self._config
        if config is None:
            return self._answer(NO_INTERFACE_DEF, message_id, "provider not configured")
        if request.method != "POST":
            return self._answer(METHOD_NOT_SUPPORTED, message_id, request.method[:16])
        if request.content_type.lower() != "application/json":
            return self._answer(MEDIA_TYPE_NOT_ACCEPTABLE, message_id, request.content_type[:64])
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            return self._answer(PARAM_ILLEGAL, message_id, f"Content-Length {length}")
        try:
            body = await request.read()  # the app's client_max_size stops a longer body being read
        except HTTPRequestEntityTooLarge:
            return self._answer(PARAM_ILLEGAL, message_id, "body over 64 KiB")

        headers = request.headers
        client_id = headers.get("Client-Id")
        if client_id != config.client_id:
            return self._answer(INVALID_CLIENT, message_id,
                                "missing Client-Id" if client_id is None else "unknown Client-Id")
        request_time = headers.get("Request-Time")
        if not request_time or not verify_signature_header(
            config.alipay_public_keys, headers.get("Signature"), method="POST", path=self.path,
            client_id=client_id, time=request_time, body=body,
        ):
            return self._answer(INVALID_SIGNATURE, message_id,
                                "missing Request-Time" if not request_time else "signature does not verify")

        routing_key = notification_routing_key(self.provider, _notify_type(body))
        if not self._inflight.try_acquire():
            return self._answer(REQUEST_TRAFFIC_EXCEED_LIMIT, message_id, "publishes in flight at the limit")
        try:
            message = notification_message(body, message_id=message_id, provider=self.provider,
                                           notify_type=routing_key.partition(".")[2])
            await self._publisher.publish(message, exchange=self._exchange, routing_key=routing_key)
        except PublishFailed as exc:
            return self._answer(UNKNOWN_EXCEPTION, message_id, str(exc))
        finally:
            self._inflight.release()
        return self._answer(SUCCESS, message_id, routing_key=routing_key)


def create_app(settings: Settings, *, broker: Broker | None = None,
               publisher: Publisher | None = None) -> web.Application:
    """The ingress application.

    By default it opens its own broker connection and confirmed publisher, and closes them on cleanup.
    Pass ``broker`` to share a connection (it is then not closed here), or ``publisher`` to publish through
    another (an in-memory one in tests).
    """
    topology = build_topology(settings)
    owned: ConfirmedPublisher | None = None
    owned_broker: Broker | None = None
    if publisher is None:
        if broker is None:
            broker = owned_broker = Broker(settings.rabbitmq_url, topology, connection_name="authnotify-ingress")
        publisher = owned = ConfirmedPublisher(broker, name="ingress", confirm_timeout=CONFIRM_TIMEOUT_SECONDS)
    inflight = InflightLimit(settings.ingress_max_inflight)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[PUBLISHER_KEY] = publisher
    app[INFLIGHT_KEY] = inflight
    for provider in PROVIDERS:
        path = NOTIFY_PATHS[provider]
        # Every method reaches the endpoint so a wrong one gets our 405 body, not aiohttp's.
        endpoint = NotificationEndpoint(provider, path, settings.provider(provider), publisher,
                                        topology.notifications_exchange, inflight)
        app.router.add_route("*", path, endpoint.handle)
    ready_publisher = publisher
    add_health_routes(app, lambda: ready_publisher.ready, not_ready="broker unavailable")

    # Read at scrape time rather than updated on every request.
    INGRESS_INFLIGHT.set_function(lambda: inflight.current)
    BROKER_CONNECTED.set_function(lambda: 1.0 if ready_publisher.ready else 0.0)

    if owned is not None:
        own_publisher, own_broker = owned, owned_broker

        async def start(_app: web.Application) -> None:
            own_publisher.start()

        async def stop(_app: web.Application) -> None:
            # on_cleanup runs after aiohttp has finished the in-flight requests: only then close the channel.
            await own_publisher.close()
            if own_broker is not None:
                await own_broker.close()

        app.on_startup.append(start)
        app.on_cleanup.append(stop)
    return app
