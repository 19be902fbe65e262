"""The HTTP ingress (Alipay's paths): check, publish with confirms, and only then answer SUCCESS.

Every request on an Alipay-facing path goes through the one check pipeline (:mod:`authnotify.ingress.checks`:
method, content type, size, Client-Id, Request-Time window, body within its time and the memory budget,
signature); a request that fails a check publishes nothing. An accepted notification is published unchanged;
its ``authorizationNotifyType`` only picks the routing key (anything unreadable goes to ``{provider}.unknown``,
kept in ``{ns}.unrouted``). Alipay+'s ``consultUnbinding`` passes the same checks and is answered from the
merchant registry, publishing nothing. With ``AUTHNOTIFY_NOTIFY_PATH_PREFIX`` (a proxy in front adds it to
the paths Alipay calls), each path is served both with and without the prefix, and verified and answered
over the prefixed one: that is what Alipay signs, whether or not the proxy strips it. The answers and their HTTP statuses are in
:mod:`authnotify.ingress.answers`. This listener serves those paths, ``/healthz`` and ``/readyz``
(docs/ingress.md); ``/metrics`` has a listener of its own (``AUTHNOTIFY_METRICS_PORT``), so Alipay's side
never sees it.
"""

from __future__ import annotations

from random import getrandbits
from typing import Any

from aiohttp import web

from authnotify.alipay.notifications import CONSULT_UNBINDING_PATH, NOTIFY_PATHS, signed_path
from authnotify.config import PROVIDERS, ProviderConfig, Settings
from authnotify.domain.authorizations import access_token_fingerprint
from authnotify.domain.merchants import UnbindingPolicy, unbinding_policy_from_settings
from authnotify.errors import PublishFailed
from authnotify.ingress.answers import (
    ALLOW_UNBINDING,
    NO_INTERFACE_DEF,
    REFUSE_UNBINDING,
    REQUEST_TRAFFIC_EXCEED_LIMIT,
    SUCCESS,
    UNKNOWN_EXCEPTION,
    UNSIGNED_HEADERS,
    AnswerSigner,
    Outcome,
)
from authnotify.ingress.checks import MAX_BODY_BYTES, BodyBudget, Refused, RequestChecks
from authnotify.messaging.connection import Broker
from authnotify.messaging.health import add_health_routes
from authnotify.messaging.messages import json_object, notification_message
from authnotify.messaging.publisher import ConfirmedPublisher, Publisher
from authnotify.messaging.topology import build_topology, notification_routing_key
from authnotify.observability import tracing
from authnotify.observability.logging import get_logger
from authnotify.observability.metrics import (
    BROKER_CONNECTED,
    INGRESS_BODY_BYTES_HELD,
    INGRESS_INFLIGHT,
    NOTIFICATIONS_RECEIVED,
    UNBINDING_CONSULTATIONS,
)

log = get_logger("authnotify.ingress")

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
BODY_BUDGET_KEY = web.AppKey("body_budget", BodyBudget)


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_message_id() -> str:
    """A random (version 4) UUID as 32 hex digits; uuid.uuid4() costs a getrandom syscall per call."""
    return f"{(getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET:032x}"


def _notify_type(body: bytes) -> str | None:
    """authorizationNotifyType of a JSON object body; None for anything else (routed as unknown)."""
    document = json_object(body)
    if document is None:
        return None
    notify_type = document.get("authorizationNotifyType")
    return notify_type if isinstance(notify_type, str) else None


class SignedEndpoint:
    """One Alipay-facing path of one provider: every request passes the one check pipeline
    (:class:`~authnotify.ingress.checks.RequestChecks`), then :meth:`accept` says what a checked body gets.

    ``path`` is the path Alipay calls and signs (:func:`~authnotify.alipay.notifications.signed_path`): requests
    are verified, and answers signed, over it. ``checks`` is None when the provider is off (no client id): every
    request is answered 404. Subclasses say what a checked body gets and how an answer is counted.
    """

    log_event = "request"

    def __init__(self, provider: str, path: str, config: ProviderConfig | None, checks: RequestChecks | None) -> None:
        self.provider = provider
        self.path = path
        self._checks = checks
        self._signer = AnswerSigner(config.client_id, config.private_key) if config else None
        # A concrete logger: the lazy proxy get_logger returns rebuilds one on every call (~70 µs).
        self._log = log.bind()

    def count(self, outcome: Outcome) -> None:
        """Counts one answer (a metric per subclass)."""

    def _answer(self, outcome: Outcome, message_id: str, reason: str | None = None, *,
                close_connection: bool = False, error: BaseException | None = None, **fields: Any) -> web.Response:
        """The signed answer, counted and logged (an unexpected ``error`` with its traceback, redacted)."""
        self.count(outcome)
        tracing.record_outcome(outcome.code, failed=outcome.status == "U", http_status=outcome.http_status)
        if outcome.status == "S":
            self._log.info(self.log_event, message_id=message_id, provider=self.provider, outcome=outcome.code,
                           **fields)
        else:
            self._log.warning(self.log_event, message_id=message_id, provider=self.provider, outcome=outcome.code,
                              http_status=outcome.http_status, reason=reason, exc_info=error, **fields)
        headers = self._signer.headers(self.path, outcome) if self._signer else UNSIGNED_HEADERS
        response = web.Response(body=outcome.body, status=outcome.http_status, headers=headers)
        if close_connection:  # an unread or cut-off body: the connection cannot carry another request
            response.force_close()
        return response

    async def handle(self, request: web.Request) -> web.Response:
        # Every request gets the id its message would carry, so each log line names one.
        message_id = new_message_id()
        with tracing.request_span(self.provider, self.path, message_id):
            return await self._checked_and_answered(request, message_id)

    async def _checked_and_answered(self, request: web.Request, message_id: str) -> web.Response:
        try:
            if self._checks is None:
                return self._answer(NO_INTERFACE_DEF, message_id, "provider not configured")
            checked = await self._checks.verify(request)
            return await self.accept(checked.body, message_id)
        except Refused as refused:
            return self._answer(refused.outcome, message_id, refused.reason, close_connection=refused.close_connection,
                                **refused.fields)
        except Exception as exc:  # a bug or a dropped client: answer U (Alipay retries), never a bare 500
            return self._answer(UNKNOWN_EXCEPTION, message_id, f"unexpected {type(exc).__name__}",
                                close_connection=True, error=exc)

    async def accept(self, body: bytes, message_id: str) -> web.Response:
        raise NotImplementedError


class NotificationEndpoint(SignedEndpoint):
    """A notify path: a checked notification is published with confirms, and only then answered SUCCESS."""

    log_event = "notification"

    def __init__(self, provider: str, path: str, config: ProviderConfig | None, checks: RequestChecks | None,
                 publisher: Publisher, exchange: str, inflight: InflightLimit) -> None:
        super().__init__(provider, path, config, checks)
        self._publisher = publisher
        self._exchange = exchange
        self._inflight = inflight
        self._received: dict[str, Any] = {}  # resolved metric children: labels() costs a lock per call

    def count(self, outcome: Outcome) -> None:
        counter = self._received.get(outcome.code)
        if counter is None:
            counter = self._received[outcome.code] = NOTIFICATIONS_RECEIVED.labels(self.provider, outcome.code)
        counter.inc()

    async def accept(self, body: bytes, message_id: str) -> web.Response:
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


def _consulted_ids(body: bytes) -> dict[str, str | None]:
    """What a consultUnbinding body says of the merchant (and the token, as a fingerprint); unreadable: nothing."""
    document = json_object(body)
    if document is None:
        return {}

    def text(name: str) -> str | None:
        value = document.get(name)
        return value if isinstance(value, str) and value else None

    token = text("accessToken")
    return {"referenceMerchantId": text("referenceMerchantId"), "authClientId": text("authClientId"),
            "fingerprint": access_token_fingerprint(token) if token else None}


class UnbindingConsultation(SignedEndpoint):
    """Alipay+ ``consultUnbinding``: checked like a notification, answered at once from the merchant registry's
    ``allow_unbinding`` flags (matched by referenceMerchantId, then authClientId, then the default). Nothing is
    published and no database is asked; a body that cannot be read is answered by the default."""

    log_event = "unbinding_consultation"

    def __init__(self, provider: str, path: str, config: ProviderConfig | None, checks: RequestChecks | None,
                 policy: UnbindingPolicy) -> None:
        super().__init__(provider, path, config, checks)
        self._policy = policy

    def count(self, outcome: Outcome) -> None:
        label = outcome.code
        if outcome in (ALLOW_UNBINDING, REFUSE_UNBINDING):
            label = "allowed" if outcome is ALLOW_UNBINDING else "refused"
        UNBINDING_CONSULTATIONS.labels(label).inc()

    async def accept(self, body: bytes, message_id: str) -> web.Response:
        ids = _consulted_ids(body)
        allowed = self._policy.allows(ids.get("referenceMerchantId"), ids.get("authClientId"))
        return self._answer(ALLOW_UNBINDING if allowed else REFUSE_UNBINDING, message_id,
                            reference_merchant_id=ids.get("referenceMerchantId"), auth_client_id=ids.get("authClientId"),
                            fingerprint=ids.get("fingerprint"), allow_unbinding=allowed)


def create_app(settings: Settings, *, broker: Broker | None = None, publisher: Publisher | None = None,
               body_budget: BodyBudget | None = None,
               unbinding_policy: UnbindingPolicy | None = None) -> web.Application:
    """The ingress application.

    By default it opens its own broker connection and confirmed publisher, and closes them on cleanup.
    Pass ``broker`` to share a connection (it is then not closed here), or ``publisher`` to publish through
    another (an in-memory one in tests). ``consultUnbinding`` is answered from ``unbinding_policy``, by
    default the merchant registry's (read once, here: a bad registry stops the start).
    """
    policy = unbinding_policy if unbinding_policy is not None else unbinding_policy_from_settings(settings)
    topology = build_topology(settings)
    owned: ConfirmedPublisher | None = None
    owned_broker: Broker | None = None
    if publisher is None:
        if broker is None:
            broker = owned_broker = Broker(settings.broker_url(), topology, connection_name="authnotify-ingress")
        publisher = owned = ConfirmedPublisher(broker, name="ingress", confirm_timeout=CONFIRM_TIMEOUT_SECONDS)
    inflight = InflightLimit(settings.ingress_max_inflight)
    budget = body_budget or BodyBudget()

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[PUBLISHER_KEY] = publisher
    app[INFLIGHT_KEY] = inflight
    app[BODY_BUDGET_KEY] = budget

    def checks_for(path: str, config: ProviderConfig | None) -> RequestChecks | None:
        return None if config is None else RequestChecks(
            path, config, budget, body_timeout=settings.ingress_body_timeout,
            request_time_tolerance=settings.request_time_tolerance)

    def serve(path: str, endpoint: SignedEndpoint) -> None:
        # Every method reaches the endpoints so a wrong one gets our 405 body, not aiohttp's.
        for served in dict.fromkeys((path, endpoint.path)):
            app.router.add_route("*", served, endpoint.handle)

    prefix = settings.notify_path_prefix
    for provider in PROVIDERS:
        path = signed_path(NOTIFY_PATHS[provider], prefix)
        config = settings.provider(provider)
        serve(NOTIFY_PATHS[provider], NotificationEndpoint(
            provider, path, config, checks_for(path, config), publisher, topology.notifications_exchange, inflight))
    aps = settings.provider("aps")
    consult_path = signed_path(CONSULT_UNBINDING_PATH, prefix)
    serve(CONSULT_UNBINDING_PATH, UnbindingConsultation("aps", consult_path, aps, checks_for(consult_path, aps), policy))
    ready_publisher = publisher
    add_health_routes(app, lambda: ready_publisher.ready, not_ready="broker unavailable")

    # Read at scrape time rather than updated on every request (a supervised process: record_gauges).
    INGRESS_INFLIGHT.set_function(lambda: inflight.current)
    INGRESS_BODY_BYTES_HELD.set_function(lambda: budget.held)
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


def record_gauges(app: web.Application) -> None:
    """Writes the current values of the gauges :func:`create_app` reads at scrape time. A process whose
    metrics are read from files by another (``--processes N``, prometheus_client's multiprocess mode) calls
    this periodically: the scrape-time functions only answer scrapes of the process itself."""
    INGRESS_INFLIGHT.set(app[INFLIGHT_KEY].current)
    INGRESS_BODY_BYTES_HELD.set(app[BODY_BUDGET_KEY].held)
    BROKER_CONNECTED.set(1.0 if app[PUBLISHER_KEY].ready else 0.0)
