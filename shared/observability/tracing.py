"""Tracing (docs/operations.md): OpenTelemetry, optional (``pip install authnotify[otel]``), and off unless
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set.

One notification is one trace. The ingress starts a span per request; the W3C ``traceparent`` (and
``tracestate``) go into the AMQP headers of every message built while a span is current
(:mod:`authnotify.messaging.messages`); each worker continues the trace of the message it handles (the
consumer runtime), so the events it emits carry it on and the merchant delivery lands in the same trace.
Calls out are child spans, made here like middleware: Alipay's gateway and the merchants' endpoints through
the HTTP client session's trace config, the database through the SQLAlchemy engine and the asyncpg fast path.

Spans carry identifiers only (message id, provider, notify type, consumer, outcome, fingerprint, merchant
entry): never a token, an auth code, a body, a signature, or a URL past its host.

Off (the extra absent, or no endpoint), every entry point costs one attribute check and nothing of
OpenTelemetry is imported. The standard ``OTEL_*`` variables the SDK reads work as documented there
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_PROPAGATORS``, ...).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import structlog

# Fields of a message's log line (observability.logging.annotate) that also go on its span: identifiers only.
SPAN_FIELDS = frozenset({"fingerprint", "new_fingerprint", "authorization_id", "merchant", "webhook_id",
                         "event_type", "command_id", "delivery", "code_exchange", "http_status"})
TRACE_HEADERS = ("traceparent", "tracestate")
DEFAULT_PROTOCOL = "grpc"  # what the Python SDK's own tooling defaults to; OTEL_EXPORTER_OTLP_PROTOCOL changes it

_NOTHING = contextlib.nullcontext()


class _State:
    __slots__ = ("enabled", "tracer", "provider")

    def __init__(self) -> None:
        self.enabled = False
        self.tracer: Any = None
        self.provider: Any = None


TRACING = _State()


def is_enabled() -> bool:
    return TRACING.enabled


# --- turning it on -----------------------------------------------------------------------------------


def configure_tracing(*, endpoint: str | None, protocol: str | None, service_name: str) -> bool:
    """Exports spans over OTLP when ``endpoint`` is set and the extra is installed; returns whether it is on.

    ``service_name`` is used unless ``OTEL_SERVICE_NAME`` (or ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``)
    names the service."""
    if not endpoint:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        structlog.get_logger("authnotify.tracing").warning(
            "tracing_unavailable", reason="OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is not installed "
                                          "(pip install authnotify[otel]): no traces")
        return False
    if (protocol or DEFAULT_PROTOCOL) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER; flushed at exit
    # The endpoint as settings resolved it (from .env too); headers, timeout... from the process's OTEL_*.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    use_tracer_provider(provider)
    structlog.get_logger("authnotify.tracing").info("tracing_on", protocol=protocol or DEFAULT_PROTOCOL,
                                                    service=resource.attributes.get(SERVICE_NAME))
    return True


def use_tracer_provider(provider: Any) -> None:
    """Traces through ``provider`` from now on (the tests pass one with an in-memory exporter)."""
    TRACING.provider = provider
    TRACING.tracer = provider.get_tracer("authnotify")
    TRACING.enabled = True


def disable_tracing() -> None:
    TRACING.enabled = False
    TRACING.tracer = TRACING.provider = None


def add_trace_id(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: the current trace's id on every log line written inside one (to find the trace
    from a log line, and the other lines of the same notification by its id)."""
    if TRACING.enabled:
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event_dict.setdefault("trace_id", f"{context.trace_id:032x}")
    return event_dict


# --- the trace in AMQP headers -----------------------------------------------------------------------


def inject_trace(headers: MutableMapping[str, Any]) -> None:
    """Writes the current span's ``traceparent`` (and ``tracestate``) into a message's headers."""
    if TRACING.enabled:
        from opentelemetry import propagate

        propagate.inject(headers)


@functools.cache
def _header_getter() -> Any:
    from opentelemetry.propagators.textmap import Getter

    class AmqpHeaderGetter(Getter[Mapping[str, Any]]):
        """Reads a propagation header from AMQP headers, whose strings may arrive as bytes."""

        def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
            value = carrier.get(key)
            if value is None:
                return None
            return [value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)]

        def keys(self, carrier: Mapping[str, Any]) -> list[str]:
            return list(carrier)

    return AmqpHeaderGetter()


# --- spans around the work -----------------------------------------------------------------------------


def request_span(provider: str, path: str, message_id: str) -> contextlib.AbstractContextManager[Any]:
    """The ingress's span around one request on an Alipay-facing path (the root of the notification's trace)."""
    if not TRACING.enabled:
        return _NOTHING
    from opentelemetry.trace import SpanKind

    return TRACING.tracer.start_as_current_span(f"POST {path}", kind=SpanKind.SERVER, attributes={
        "http.request.method": "POST", "url.path": path, "messaging.message.id": message_id,
        "authnotify.provider": provider})


def message_span(consumer: str, namespace: str, headers: Mapping[str, Any] | None, *, message_id: str,
                 provider: str | None, notify_type: str | None,
                 attempt: int) -> contextlib.AbstractContextManager[Any]:
    """A worker's span around one message, continuing the trace its headers carry."""
    if not TRACING.enabled:
        return _NOTHING
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    parent = propagate.extract(headers or {}, getter=_header_getter())
    attributes = {"messaging.system": "rabbitmq", "messaging.operation.type": "process",
                  "messaging.destination.name": f"{namespace}.{consumer}", "messaging.message.id": message_id,
                  "authnotify.consumer": consumer, "authnotify.attempt": attempt}
    if provider:
        attributes["authnotify.provider"] = provider
    if notify_type:
        attributes["authnotify.notify_type"] = notify_type
    return TRACING.tracer.start_as_current_span(f"process {consumer}", context=parent, kind=SpanKind.CONSUMER,
                                                attributes=attributes)


def record_outcome(outcome: str, *, failed: bool = False, http_status: int | None = None) -> None:
    """The outcome of the current span's work (a result code, or ok/retried/dead-lettered); ``failed`` marks
    the span as an error (a U answer, a retry, a dead letter). Reasons stay in the log line."""
    if not TRACING.enabled:
        return
    from opentelemetry import trace
    from opentelemetry.trace import StatusCode

    span = trace.get_current_span()
    span.set_attribute("authnotify.outcome", outcome)
    if http_status is not None:
        span.set_attribute("http.response.status_code", http_status)
    if failed:
        span.set_status(StatusCode.ERROR, outcome)


def annotate_span(fields: Mapping[str, Any]) -> None:
    """The identifiers among a message's log fields, on its span too (see :data:`SPAN_FIELDS`)."""
    if not TRACING.enabled:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    for name, value in fields.items():
        if name in SPAN_FIELDS and isinstance(value, (str, int, float, bool)):
            span.set_attribute(f"authnotify.{name}", value)


# --- calls out: HTTP and the database ----------------------------------------------------------------------


def _origin(url: Any) -> str:
    """Scheme, host and port only: merchants put credentials in paths and query strings."""
    return str(url.origin()) if hasattr(url, "origin") else ""


def _name_http_span(span: Any, params: Any) -> None:
    """Alipay's calls are named by operation (``alipay applyToken``), merchant deliveries ``merchant webhook``."""
    if span is None or not span.is_recording():
        return
    headers = params.headers
    if "webhook-id" in headers:
        span.update_name("merchant webhook")
        span.set_attribute("authnotify.webhook_id", headers["webhook-id"])
    elif "Client-Id" in headers:
        operation = params.url.path.rstrip("/").rpartition("/")[2]
        span.update_name(f"alipay {operation}")
        span.set_attribute("authnotify.alipay_operation", operation)


def http_trace_configs() -> list[Any]:
    """The ``trace_configs`` of the workers' HTTP client session: a child span per call (none when off)."""
    if not TRACING.enabled:
        return []
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config

    return [create_trace_config(url_filter=_origin, request_hook=_name_http_span, tracer_provider=TRACING.provider)]


class _ChildSpansOnly:
    """A tracer whose spans exist only inside a trace (a message being handled): the statements a process
    runs on its own (the migrations at start, the scheduler's passes) do not each become a trace of one span."""

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer

    def start_span(self, name: str, context: Any = None, *args: Any, **kwargs: Any) -> Any:
        from opentelemetry import trace

        if not trace.get_current_span(context).get_span_context().is_valid:
            return trace.INVALID_SPAN
        return self._tracer.start_span(name, context, *args, **kwargs)


def instrument_engine(engine: Any) -> None:
    """A span per statement of this SQLAlchemy engine (its text with placeholders, never the values)."""
    if not TRACING.enabled:
        return
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.metrics import get_meter

    connections = get_meter("authnotify").create_up_down_counter("db.client.connections.usage")
    EngineTracer(_ChildSpansOnly(TRACING.tracer), getattr(engine, "sync_engine", engine), connections)


def asyncpg_query_spans(name: str) -> Callable[[Any], Awaitable[None]] | None:
    """An asyncpg pool ``init`` that records a span ``name`` per query of its connections (None when off)."""
    if not TRACING.enabled:
        return None
    from opentelemetry.trace import SpanKind

    tracer = _ChildSpansOnly(TRACING.tracer)

    def record(query: Any) -> None:  # called by asyncpg just after the query, in the context that ran it
        end = time.time_ns()
        # A client span, like the SQLAlchemy instrumentation's: the database is another service.
        span = tracer.start_span(name, kind=SpanKind.CLIENT, start_time=end - int(query.elapsed * 1e9), attributes={
            "db.system.name": "postgresql", "db.operation.name": name.partition(" ")[0]})
        if query.exception is not None:
            from opentelemetry.trace import StatusCode

            span.set_status(StatusCode.ERROR, type(query.exception).__name__)
        span.end(end_time=end)

    async def init(connection: Any) -> None:
        connection.add_query_logger(record)

    return init

