"""Tracing (docs/operations.md): one notification is one trace, from the ingress to the merchant delivery.

Spans go to the OpenTelemetry SDK's in-memory exporter. The end-to-end tests run the real ingress, the real
broker and the workers in this process, against the sandbox Alipay gateway and merchant endpoint.
"""

from __future__ import annotations

import http.server
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography.fernet import Fernet
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from authnotify.config import Settings, load_settings
from authnotify.config.settings import unknown_variables
from authnotify.devtools.sandbox.alipay_gateway import RunningAlipayGateway
from authnotify.devtools.sandbox.merchant_endpoint import start_merchant_endpoint
from authnotify.domain.authorizations import access_token_fingerprint
from authnotify.domain.merchants import generate_secret
from authnotify.errors import ConfigError
from authnotify.messaging.consumer import ConsumerSpec, DeliveryProcessor, MessageContext
from authnotify.messaging.memory import InMemoryPublisher
from authnotify.messaging.messages import notification_message
from authnotify.messaging.topology import Consumer, build_topology
from authnotify.observability import tracing
from authnotify.observability.logging import annotate
from tests.conftest import TestKeys as Keys
from tests.events_harness import aps_token_created, eventually, running_workers
from tests.fakes import FakeDelivery
from tests.ingress_harness import PROVIDER_CASES, notification_headers, start_ingress

APS = PROVIDER_CASES[1]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into an in-memory exporter, for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    yield exporter
    tracing.disable_tracing()
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


# --- off, and the pieces ------------------------------------------------------------------------------


def test_off_by_default_messages_carry_no_trace_and_nothing_is_instrumented() -> None:
    assert not tracing.is_enabled()
    message = notification_message(b"{}", message_id="m1", provider="aps", notify_type="TOKEN_CREATED")
    assert "traceparent" not in message.headers
    assert tracing.http_trace_configs() == []
    assert tracing.asyncpg_query_spans("INSERT x") is None
    with tracing.request_span("aps", "/p", "m1") as span:
        assert span is None
    assert not tracing.configure_tracing(endpoint=None, protocol=None, service_name="authnotify-test")


def test_the_standard_variables_turn_it_on_and_a_bad_protocol_is_named(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.example:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    settings = load_settings()
    # Over HTTP the general endpoint takes the signal's path, as the SDK does with its variables.
    assert (settings.tracing_endpoint(), settings.tracing_protocol()) == ("http://collector.example:4318/v1/traces",
                                                                          "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces.example:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    settings = load_settings()
    assert (settings.tracing_endpoint(), settings.tracing_protocol()) == ("http://traces.example:4317", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ConfigError, match="^OTEL_EXPORTER_OTLP_PROTOCOL: "):
        load_settings()
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    assert load_settings().tracing_endpoint() is None  # blank is unset: tracing stays off
    # Not AUTHNOTIFY_ variables: never warned about, and AUTHNOTIFY_OTEL_... is not a name either.
    assert unknown_variables({"AUTHNOTIFY_OTEL_EXPORTER_OTLP_ENDPOINT": "x"}, tmp_path / ".env") == [
        ("AUTHNOTIFY_OTEL_EXPORTER_OTLP_ENDPOINT", None)]


def test_the_variables_in_env_file_send_spans_to_that_collector(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """Settings read OTEL_* from .env as well as the environment; the exporter must send where they say, not to
    the SDK's default (it reads only the process environment)."""
    from opentelemetry import trace

    received: list[str] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    monkeypatch.chdir(tmp_path)
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                     "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / ".env").write_text(f"OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{collector.server_port}\n"
                                   "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf\n")
    installed: list[Any] = []
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)
    settings = load_settings()
    try:
        assert tracing.configure_tracing(endpoint=settings.tracing_endpoint(), protocol=settings.tracing_protocol(),
                                         service_name="authnotify-test")
        (provider,) = installed
        with provider.get_tracer("test").start_as_current_span("one"):
            pass
        assert provider.force_flush(10_000)
        assert received == ["/v1/traces"]
    finally:
        tracing.disable_tracing()
        for provider in installed:
            provider.shutdown()
        collector.shutdown()


def test_an_endpoint_without_the_extra_says_so_once_and_runs_without_traces(
    monkeypatch: pytest.MonkeyPatch, json_logs: None, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if the extra were not installed
    assert not tracing.configure_tracing(endpoint="http://collector:4317", protocol=None, service_name="authnotify-x")
    assert not tracing.is_enabled()
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [line["event"] for line in lines] == ["tracing_unavailable"]
    assert "pip install authnotify[otel]" in lines[0]["reason"]


def test_configured_with_an_endpoint_it_exports_over_otlp_under_the_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import trace

    installed: list[Any] = []
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)  # the process-wide one stays untouched
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    try:
        assert tracing.configure_tracing(endpoint="http://127.0.0.1:1", protocol="http/protobuf",
                                         service_name="authnotify-worker")
        (provider,) = installed
        assert provider.resource.attributes["service.name"] == "authnotify-worker"
        monkeypatch.setenv("OTEL_SERVICE_NAME", "payments-webhooks")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
        assert tracing.configure_tracing(endpoint="http://127.0.0.1:1", protocol=None, service_name="authnotify-worker")
        assert installed[1].resource.attributes["service.name"] == "payments-webhooks"
        assert "TraceIdRatioBased{0.25}" in installed[1].sampler.get_description()
    finally:
        tracing.disable_tracing()
        for provider in installed:
            provider.shutdown()


def test_the_trace_travels_in_the_message_headers_and_the_worker_continues_it(spans: InMemorySpanExporter) -> None:
    with tracing.request_span("aps", "/aps/api/v1/authorizations/authNotify", "m-1"):
        message = notification_message(b"{}", message_id="m-1", provider="aps", notify_type="TOKEN_CREATED")
    traceparent = message.headers["traceparent"]
    (ingress,) = spans.get_finished_spans()
    assert traceparent.split("-")[1] == f"{ingress.context.trace_id:032x}"
    # aio-pika hands header strings over as bytes or str: either continues the trace.
    for value in (traceparent, traceparent.encode()):
        with tracing.message_span("token-created", "ns", {"traceparent": value}, message_id="m-1", provider="aps",
                                  notify_type="TOKEN_CREATED", attempt=1):
            pass
    continued = named(spans, "process token-created")
    assert [s.context.trace_id for s in continued] == [ingress.context.trace_id] * 2
    assert all(parent_of(s) == ingress.context.span_id and s.kind is SpanKind.CONSUMER for s in continued)


async def test_a_handled_message_span_has_its_outcome_and_identifiers_never_its_secrets(
    spans: InMemorySpanExporter,
) -> None:
    async def parse(body: bytes, context: MessageContext) -> bytes:
        return body

    async def handle(body: bytes, context: MessageContext) -> None:
        annotate(fingerprint="3f1c00aa", authorization_id="auth_x", accessToken="AT-NEVER-ON-A-SPAN")

    spec = ConsumerSpec(Consumer.TOKEN_CREATED, parse, handle)
    topology = build_topology(Settings(_env_file=None, namespace="traced"))  # type: ignore[call-arg]
    processor = DeliveryProcessor(topology, InMemoryPublisher())
    body = orjson.dumps({"accessToken": "AT-NEVER-ON-A-SPAN", "authCode": "CODE-NEVER-ON-A-SPAN"})
    await processor.process(spec, FakeDelivery(body=body, message_id="m-7", headers={"authnotify-provider": "aps"}))
    (span,) = named(spans, "process token-created")
    attributes = dict(span.attributes or {})
    assert attributes["authnotify.outcome"] == "ok"
    assert attributes["authnotify.fingerprint"] == "3f1c00aa" and attributes["authnotify.authorization_id"] == "auth_x"
    assert attributes["messaging.message.id"] == "m-7" and attributes["messaging.destination.name"] == "traced.token-created"
    assert "NEVER-ON-A-SPAN" not in repr(attributes)


# --- one notification, one trace, on the real broker ---------------------------------------------------------


@pytest.fixture
def traced_settings(make_settings: Callable[..., Settings], gateway: RunningAlipayGateway,
                    tmp_path: Path) -> Callable[..., Settings]:
    def factory(merchant_url: str, merchant_secret: str, **overrides: Any) -> Settings:
        registry = tmp_path / f"merchants-{uuid.uuid4().hex[:6]}.toml"
        registry.write_text(f'[merchants.default]\nurl = "{merchant_url}"\nsecret = "{merchant_secret}"\n')
        values: dict[str, Any] = {"database_url": f"sqlite+aiosqlite:///{tmp_path}/traced.db",
                                  "token_keys": Fernet.generate_key().decode(), "ams_gateway_url": gateway.url,
                                  "aps_gateway_url": gateway.url, "merchants_file": registry}
        return make_settings(**{**values, **overrides})

    return factory


async def send(ingress_url: str, keys: Keys, body: bytes) -> None:
    headers = notification_headers(keys.alipay.private_key, APS, body)
    async with aiohttp.ClientSession() as http, http.post(ingress_url + APS.path, data=body, headers=headers) as response:
        assert response.status == 200


async def test_one_authcode_notification_is_one_trace_from_the_ingress_to_the_merchant_delivery(
    spans: InMemorySpanExporter, traced_settings: Callable[..., Settings], gateway: RunningAlipayGateway, keys: Keys,
) -> None:
    secret = generate_secret()
    merchant = await start_merchant_endpoint(secret)
    settings = traced_settings(merchant.url_for("/hooks?token=MERCHANT-URL-SECRET"), secret)
    code = "281010133AB2F588" + uuid.uuid4().hex[:16].upper()
    body = orjson.dumps({
        "authorizationNotifyType": "AUTHCODE_CREATED", "authClientId": "218823863726123456789",
        "referenceMerchantId": "218823863726123456780", "authCode": code, "authState": "state-1",
        "referenceAgreementId": f"agreement-{uuid.uuid4().hex[:8]}", "acquirerId": "1021234567891230001",
        "pspId": "1021234567891230002"})
    try:
        async with running_workers(settings, "authcode-created", "merchant-events"):
            ingress = await start_ingress(settings)
            try:
                await send(ingress.url, keys, body)
                await merchant.endpoint.wait_for_delivered(1)

                async def delivery_traced() -> bool:
                    return bool(named(spans, "process merchant-events"))

                await eventually(delivery_traced, what="the merchant-events span to end")
            finally:
                await ingress.stop()
    finally:
        await merchant.aclose()

    finished = spans.get_finished_spans()
    (root,) = named(spans, f"POST {APS.path}")
    (worker,) = named(spans, "process authcode-created")
    (apply_token,) = named(spans, "alipay applyToken")
    (delivery,) = named(spans, "process merchant-events")
    (webhook,) = named(spans, "merchant webhook")
    database = [span for span in finished if (span.attributes or {}).get("db.system") == "sqlite"
                or (span.attributes or {}).get("db.system.name") == "sqlite"]
    assert {span.context.trace_id for span in finished} == {root.context.trace_id}  # one trace, nothing else
    assert root.parent is None and root.kind is SpanKind.SERVER
    assert (root.attributes or {})["authnotify.outcome"] == "SUCCESS"
    assert parent_of(worker) == root.context.span_id
    assert parent_of(apply_token) == worker.context.span_id and apply_token.kind is SpanKind.CLIENT
    assert database and all(parent_of(span) == worker.context.span_id for span in database)
    assert parent_of(delivery) == worker.context.span_id  # the merchant event carried the trace
    assert parent_of(webhook) == delivery.context.span_id
    assert (worker.attributes or {})["authnotify.outcome"] == "ok" and (delivery.attributes or {})["authnotify.outcome"] == "ok"
    access_token, refresh_token = gateway.gateway.tokens_for("aps", code)
    assert (worker.attributes or {})["authnotify.fingerprint"] == access_token_fingerprint(access_token)
    # The merchant saw the trace too (W3C traceparent on the webhook request).
    assert merchant.endpoint.delivered[0].headers["traceparent"].split("-")[1] == f"{root.context.trace_id:032x}"
    everything = repr([(span.name, dict(span.attributes or {})) for span in finished])
    for secret_value in (code, access_token, refresh_token, "MERCHANT-URL-SECRET", "/hooks"):
        assert secret_value not in everything


async def test_the_fast_insert_of_token_created_is_a_database_span_of_its_trace(
    spans: InMemorySpanExporter, traced_settings: Callable[..., Settings], keys: Keys, database_url: str,
) -> None:
    secret = generate_secret()
    merchant = await start_merchant_endpoint(secret)
    settings = traced_settings(merchant.url_for(), secret, database_url=database_url)
    token = f"AT-{uuid.uuid4().hex}"
    try:
        async with running_workers(settings, "token-created"):
            ingress = await start_ingress(settings)
            try:
                await send(ingress.url, keys, orjson.dumps(aps_token_created(token)))

                async def handled() -> bool:
                    return bool(named(spans, "process token-created"))

                await eventually(handled, what="the token-created span to end")
            finally:
                await ingress.stop()
    finally:
        await merchant.aclose()
    (worker,) = named(spans, "process token-created")
    children = [span for span in spans.get_finished_spans() if parent_of(span) == worker.context.span_id]
    assert children, "no database span under the worker's"
    assert all(span.kind is SpanKind.CLIENT for span in children)  # the database is another service
    if database_url.startswith("postgresql"):
        assert "INSERT authorizations" in [span.name for span in children]  # the asyncpg fast path
    assert token not in repr([dict(span.attributes or {}) for span in spans.get_finished_spans()])


def test_log_lines_written_inside_a_trace_name_it(spans: InMemorySpanExporter, json_logs: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from authnotify.observability.logging import get_logger

    capsys.readouterr()
    with tracing.request_span("ams", "/ams/notifyAuthorization", "m-9"):
        get_logger("authnotify.test").info("inside")
    get_logger("authnotify.test").info("outside")
    inside, outside = (orjson.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{"))
    (span,) = spans.get_finished_spans()
    assert inside["trace_id"] == f"{span.context.trace_id:032x}" and "trace_id" not in outside
