"""The HTTP ingress (contract section 4): check, publish with confirms, and only then answer SUCCESS.

Checks run in the contract's order (method, content type, size, Client-Id, signature) and a request that
fails one publishes nothing. An accepted body is published unchanged; its ``authorizationNotifyType`` only
picks the routing key (anything unreadable goes to ``{provider}.unknown``, kept in ``{ns}.unrouted``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import os
import signal
import socket
import time
from datetime import UTC, datetime
from random import getrandbits
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_exceptions import HTTPRequestEntityTooLarge

from authnotify.messaging.publisher import NotificationPublisher, PublishFailed
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
from authnotify.messaging import headers as messages
from authnotify.messaging.connection import Broker
from authnotify.config.settings import PROVIDERS, ProviderConfig, Settings
from authnotify.observability.logging import get_logger
from authnotify.observability.metrics import BROKER_CONNECTED, INGRESS_INFLIGHT, NOTIFICATIONS_RECEIVED, render_metrics
from authnotify.alipay.signature import ALGORITHM, SignatureHeader, signed_content, verify_signature, verify_signature_header
from authnotify.messaging.topology import build_topology, notification_routing_key

log = get_logger("authnotify.ingress")

NOTIFY_PATHS: dict[str, str] = {
    "ams": "/ams/notifyAuthorization",
    "aps": "/aps/api/v1/authorizations/authNotify",
}
MAX_BODY_BYTES = 64 * 1024
# In-flight publishes give up after CONFIRM_TIMEOUT_SECONDS, so a drain never needs longer than this.
DRAIN_TIMEOUT_SECONDS = 10.0
LISTEN_BACKLOG = 1024

SETTINGS_KEY = web.AppKey("settings", Settings)
BROKER_KEY = web.AppKey("broker", Broker)
PUBLISHER_KEY = web.AppKey("publisher", NotificationPublisher)


class NotificationEndpoint:
    """One provider's notify path; ``config`` is None when the provider is off (no client id)."""

    def __init__(self, provider: str, path: str, config: ProviderConfig | None,
                 publisher: NotificationPublisher) -> None:
        self.provider = provider
        self.path = path
        self._config = config
        self._publisher = publisher
        self._signer = AnswerSigner(config.client_id, config.private_key) if config else None
        self._received: dict[str, Any] = {}  # resolved metric children: labels() costs a lock per call
        # A concrete logger: the lazy proxy get_logger returns rebuilds one on every call (~70 µs).
        self._log = log.bind()

    def _answer(self, outcome: Outcome, message_id: str, reason: str | None = None,
                routing_key: str | None = None) -> web.Response:
        counter = self._received.get(outcome.code)
        if counter is None:
            counter = self._received[outcome.code] = NOTIFICATIONS_RECEIVED.labels(self.provider, outcome.code)
        counter.inc()
        if outcome is SUCCESS:
            self._log.info("notification", message_id=message_id, provider=self.provider,
                           outcome=outcome.code, routing_key=routing_key)
        else:
            self._log.warning("notification", message_id=message_id, provider=self.provider,
                              outcome=outcome.code, http_status=outcome.http_status, reason=reason)
        headers = self._signer.headers(self.path, outcome) if self._signer else UNSIGNED_HEADERS
        return web.Response(body=outcome.body, status=outcome.http_status, headers=headers)

    async def handle(self, request: web.Request) -> web.Response:
        # Every request gets the id its message would carry, so each log line names one.
        message_id = new_message_id()
        try:
            return await self._check_and_publish(request, message_id)
        except Exception as exc:  # a bug or a dropped client: answer U (Alipay retries), never a bare 500
            return self._answer(UNKNOWN_EXCEPTION, message_id, f"unexpected {type(exc).__name__}")

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
        if not request_time or not _verify(config, headers.get("Signature"), self.path, client_id,
                                           request_time, body):
            return self._answer(INVALID_SIGNATURE, message_id,
                                "missing Request-Time" if not request_time else "signature does not verify")

        routing_key = notification_routing_key(self.provider, _notify_type(body))
        if not self._publisher.inflight.try_acquire():
            return self._answer(REQUEST_TRAFFIC_EXCEED_LIMIT, message_id, "publishes in flight at the limit")
        try:
            await self._publisher.publish(
                body,
                routing_key=routing_key,
                message_id=message_id,
                headers={
                    messages.PROVIDER: self.provider,
                    messages.NOTIFY_TYPE: routing_key.partition(".")[2],
                    messages.RECEIVED_AT: received_at(),
                    messages.ATTEMPT: 1,
                },
            )
        except PublishFailed as exc:
            return self._answer(UNKNOWN_EXCEPTION, message_id, str(exc))
        finally:
            self._publisher.inflight.release()
        return self._answer(SUCCESS, message_id, routing_key=routing_key)


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_message_id() -> str:
    """A random (version 4) UUID as 32 hex digits; uuid.uuid4() costs a getrandom syscall per call."""
    return f"{(getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET:032x}"


_CANONICAL_SIGNATURE_PREFIX = "algorithm=RSA256,keyVersion="
_SIGNATURE_PART = ",signature="
# A base64 signature URL-encoded (sign_content's quote(..., safe="")) has only these escapes.
_BASE64_ESCAPES = (("%2B", "+"), ("%2F", "/"), ("%3D", "="))


def _verify(config: ProviderConfig, header: str | None, path: str, client_id: str, request_time: str,
            body: bytes) -> bool:
    """verify_signature_header with a fast path for the header exactly as Alipay writes it
    (``algorithm=RSA256,keyVersion=N,signature=<URL-encoded base64>``): the general parser and
    urllib's unquote cost about 10 µs a request. Anything else goes the general, lenient way."""
    if header is not None and header.startswith(_CANONICAL_SIGNATURE_PREFIX):
        version, found, encoded = header[len(_CANONICAL_SIGNATURE_PREFIX):].partition(_SIGNATURE_PART)
        if found and version.isdigit() and encoded and "," not in encoded and " " not in encoded:
            for escaped, plain in _BASE64_ESCAPES:
                encoded = encoded.replace(escaped, plain)
            if "%" not in encoded:
                try:
                    raw = base64.b64decode(encoded, validate=True)
                except (binascii.Error, ValueError):
                    return False
                return verify_signature(
                    config.alipay_public_keys, SignatureHeader(ALGORITHM, version, raw),
                    signed_content("POST", path, client_id, request_time, body),
                )
    return verify_signature_header(config.alipay_public_keys, header, method="POST", path=path,
                                   client_id=client_id, time=request_time, body=body)


_received_second = -1
_received_prefix = ""


def received_at() -> str:
    """messages.utc_now_iso() (ISO UTC, milliseconds, "Z"), formatting the date and time once a second."""
    global _received_second, _received_prefix
    now = time.time()
    second = int(now)
    if second != _received_second:
        _received_prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _received_second = second
    return f"{_received_prefix}{int((now - second) * 1000):03d}Z"


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


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready = request.app[PUBLISHER_KEY].ready
    return web.json_response({"status": "ready" if ready else "broker unavailable"},
                             status=200 if ready else 503)


async def _metrics(_request: web.Request) -> web.Response:
    payload, content_type = render_metrics()
    return web.Response(body=payload, headers={"Content-Type": content_type})


def create_app(settings: Settings, broker: Broker | None = None) -> web.Application:
    """The ingress application; pass ``broker`` to share a connection (it is then not closed here)."""
    owns_broker = broker is None
    if broker is None:
        broker = Broker(settings.rabbitmq_url, build_topology(settings), connection_name="authnotify-ingress")
    publisher = NotificationPublisher(broker, max_inflight=settings.ingress_max_inflight)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SETTINGS_KEY] = settings
    app[BROKER_KEY] = broker
    app[PUBLISHER_KEY] = publisher
    for provider in PROVIDERS:
        path = NOTIFY_PATHS[provider]
        # Every method reaches the endpoint so a wrong one gets our 405 body, not aiohttp's.
        endpoint = NotificationEndpoint(provider, path, settings.provider(provider), publisher)
        app.router.add_route("*", path, endpoint.handle)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)

    # Read at scrape time rather than updated on every request.
    INGRESS_INFLIGHT.set_function(lambda: publisher.inflight.current)
    BROKER_CONNECTED.set_function(lambda: 1.0 if publisher.ready else 0.0)

    async def start(_app: web.Application) -> None:
        publisher.start()

    async def stop(_app: web.Application) -> None:
        # on_cleanup runs after aiohttp has finished the in-flight requests: only then close the channel.
        await publisher.close()
        if owns_broker:
            await broker.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def _listen(host: str, port: int) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)


async def run_ingress(settings: Settings) -> int:
    """Serves until SIGTERM or SIGINT, then stops listening, answers what is in flight and exits 0."""
    from authnotify.cli.main import EXIT_USAGE, CommandError

    enabled = [name for name in PROVIDERS if settings.provider(name) is not None]
    if not enabled:
        raise CommandError(
            "authnotify: no provider configured: set AUTHNOTIFY_AMS_CLIENT_ID or AUTHNOTIFY_APS_CLIENT_ID",
            EXIT_USAGE,
        )
    # Bind before anything starts, so a port in use fails with one line and no broker chatter.
    try:
        listener = _listen(settings.http_host, settings.http_port)
    except OSError as exc:
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise CommandError(f"authnotify: cannot listen on {settings.http_host}:{settings.http_port} ({reason})") from None
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=DRAIN_TIMEOUT_SECONDS)
    await runner.setup()
    await web.SockSite(runner, listener).start()
    # Everything allocated so far lives as long as the process: keep the collector from rescanning it.
    gc.collect()
    gc.freeze()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("ingress_listening", host=settings.http_host, port=settings.http_port, providers=enabled,
             paths=[NOTIFY_PATHS[name] for name in enabled])
    try:
        await stopping.wait()
        log.info("ingress_draining", inflight=app[PUBLISHER_KEY].inflight.current)
        await runner.cleanup()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("ingress_stopped")
    return 0
