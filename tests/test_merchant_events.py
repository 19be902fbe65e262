"""Merchant events (docs/events.md): the registry, signed delivery, routing, filters, retries, dead letters."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from standardwebhooks import Webhook

from authnotify.config import Settings
from authnotify.devtools.sandbox.merchant_endpoint import RunningMerchantEndpoint, start_merchant_endpoint
from authnotify.domain.authorizations import AuthorizationData, access_token_fingerprint
from authnotify.domain.events import MerchantEvent
from authnotify.domain.merchants import (
    Endpoint,
    generate_secret,
    load_merchant_registry,
    merchant_registry_from_settings,
    parse_merchant_registry,
    unbinding_policy_from_settings,
)
from authnotify.errors import ConfigError, PermanentError, TransientError
from authnotify.messaging import headers as h
from authnotify.messaging.consumer import MessageContext
from authnotify.messaging.topology import Consumer, build_topology
from authnotify.workers import merchant_events
from authnotify.workers.merchant_circuit import CircuitOpen, MerchantCircuits
from authnotify.workers.merchant_events import handle_merchant_event, merchant_circuits_from_settings, signed_headers
from authnotify.workers.resources import Resources
from tests.events_harness import declare, eventually, metric, publish_event, running_workers, take_all, take_messages

FAST_RETRIES = "200ms,400ms"
PROCESSED = "authnotify_messages_processed_total"
DELIVERIES = "authnotify_merchant_deliveries_total"


def event_for(*, merchant: str | None = "M-1", client: str | None = "C-1", provider: str = "aps",
              event_type: str = "authorization.activated") -> MerchantEvent:
    token = f"tok-{uuid.uuid4().hex}"
    data = AuthorizationData(
        provider=provider,  # type: ignore[arg-type]
        status="active" if event_type == "authorization.activated" else "canceled",
        accessTokenFingerprint=access_token_fingerprint(token),
        referenceMerchantId=merchant,
        authClientId=client,
        referenceAgreementId="agreement-1",
        scopes=["AGREEMENT_PAY"],
    )
    return MerchantEvent.of(event_type, data, datetime.now(UTC))  # type: ignore[arg-type]


def toml_entry(name: str, url: str, secret: str, events: list[str] | None = None) -> str:
    key = name if name == "default" else f'"{name}"'
    lines = [f"[merchants.{key}]", f'url = "{url}"', f'secret = "{secret}"']
    if events is not None:
        lines.append("events = [" + ", ".join(f'"{e}"' for e in events) + "]")
    return "\n".join(lines) + "\n\n"


def context(attempt: int = 1) -> MessageContext:
    return MessageContext(Consumer.MERCHANT_EVENTS, "m1", "aps", "authorization.activated", attempt, attempt > 1)


# --- the registry ----------------------------------------------------------------------------------


def test_registry_routes_by_reference_merchant_id_then_auth_client_id_then_default() -> None:
    registry = parse_merchant_registry(
        toml_entry("default", "https://default.example/hook", generate_secret())
        + toml_entry("M-1", "https://m1.example/hook", generate_secret())
        + toml_entry("C-2", "https://c2.example/hook", generate_secret(), ["authorization.canceled"])
    )
    by = registry.endpoint_for
    assert by(event_for(merchant="M-1", client="C-2").data).name == "M-1"  # type: ignore[union-attr]
    assert by(event_for(merchant="other", client="C-2").data).name == "C-2"  # type: ignore[union-attr]
    assert by(event_for(merchant=None, client="M-1").data).name == "M-1"  # type: ignore[union-attr]
    assert by(event_for(merchant="x", client="y").data).name == "default"  # type: ignore[union-attr]
    c2 = registry.entries["C-2"]
    assert c2.accepts("authorization.canceled") and not c2.accepts("authorization.activated")
    assert registry.default is not None and registry.default.accepts("authorization.activated")


def test_registry_without_default_has_no_endpoint_for_unknown_merchants() -> None:
    registry = parse_merchant_registry(toml_entry("M-1", "https://m1.example/hook", generate_secret()))
    assert registry.endpoint_for(event_for(merchant="x", client="y").data) is None


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("[merchants.default\n", "not valid TOML"),
        ("", "defines no merchants"),
        ('[other]\nx = 1\n', "unknown top-level key 'other'"),
        ('[merchants."M-1"]\nsecret = "SECRET"\n', '[merchants."M-1"] url is required'),
        ('[merchants.default]\nurl = "ftp://x"\nsecret = "SECRET"\n', "[merchants.default] url must be an absolute http"),
        ('[merchants.default]\nurl = "https://x.example"\n', "[merchants.default] secret is required"),
        ('[merchants.default]\nurl = "https://x.example"\nsecret = "SECRETBODY"\n', "secret must be whsec_"),
        ('[merchants.default]\nurl = "https://x.example"\nsecret = "whsec_%%notbase64"\n', "secret must be whsec_"),
        ('[merchants.default]\nurl = "https://x.example"\nsecret = "whsec_c2hvcnRzaG9ydHNob3J0"\n', "decodes to 15 bytes"),
        ('[merchants.default]\nurl = "https://x.example"\nsecret = "SECRET"\nevents = ["authorization.paused"]\n',
         "events: unknown type 'authorization.paused'"),
        ('[merchants.default]\nurl = "https://x.example"\nsecret = "SECRET"\nevent = ["authorization.canceled"]\n',
         "unknown key 'event'"),
    ],
)
def test_registry_errors_are_one_line_naming_the_variable_and_the_entry(
    document: str, expected: str, tmp_path: Path
) -> None:
    secret = generate_secret()
    path = tmp_path / "merchants.toml"
    path.write_text(document.replace("SECRETBODY", secret[6:]).replace("SECRET", secret))
    with pytest.raises(ConfigError) as caught:
        load_merchant_registry(path)
    message = str(caught.value)
    assert message.startswith(f"AUTHNOTIFY_MERCHANTS_FILE={path}: ")
    assert expected in message
    assert "\n" not in message
    assert secret[6:] not in message  # a secret never shows in an error


def test_registry_secret_sizes_and_missing_file(tmp_path: Path) -> None:
    for size in (24, 64):
        parse_merchant_registry(toml_entry("default", "https://x.example", generate_secret(size)))
    for size in (23, 65):
        with pytest.raises(ConfigError, match=f"decodes to {size} bytes"):
            parse_merchant_registry(toml_entry("default", "https://x.example", generate_secret(size)))
    with pytest.raises(ConfigError, match="no such file"):
        load_merchant_registry(tmp_path / "absent.toml")
    endpoint = Endpoint("default", "https://x.example", (generate_secret(), generate_secret()))
    assert all(secret not in repr(endpoint) for secret in endpoint.secrets)


def test_registry_takes_a_list_of_secrets_for_rotation_and_names_a_bad_one() -> None:
    new, old = generate_secret(), generate_secret()
    registry = parse_merchant_registry(f'[merchants.default]\nurl = "https://x.example"\nsecrets = ["{new}", "{old}"]\n')
    assert registry.default is not None and registry.default.secrets == (new, old)
    with pytest.raises(ConfigError, match=r"\[merchants.default\] secrets\[2\] must be whsec_"):
        parse_merchant_registry(f'[merchants.default]\nurl = "https://x.example"\nsecrets = ["{new}", "nope"]\n')
    with pytest.raises(ConfigError, match="secret or secrets, not both"):
        parse_merchant_registry(f'[merchants.default]\nurl = "https://x.example"\nsecret = "{new}"\nsecrets = ["{old}"]\n')
    with pytest.raises(ConfigError, match="secret is required"):
        parse_merchant_registry('[merchants.default]\nurl = "https://x.example"\nsecrets = []\n')


def test_a_secret_may_be_read_from_a_file_where_events_are_signed_and_only_there(
    tmp_path: Path, offline_settings: Callable[..., Settings]
) -> None:
    """The ingress reads the registry for allow_unbinding only: a secret given as @/path stays unread there,
    so a deployment mounts the secret files into the merchant-events worker alone."""
    secret, old = generate_secret(), generate_secret()
    secret_file = tmp_path / "default.secret"
    secret_file.write_text(f"{secret}\n")  # as `kubectl create secret` or an editor leaves it
    registry_path = tmp_path / "merchants.toml"
    registry_path.write_text(f'[merchants.default]\nurl = "https://x.example"\nsecrets = ["@{secret_file}", "{old}"]\n'
                             f'[merchants."M-1"]\nurl = "https://m1.example"\nsecret = "@{tmp_path}/absent"\n'
                             "allow_unbinding = false\n")
    settings = offline_settings(merchants_file=str(registry_path))

    # The ingress: the flags, without reading (or needing) any secret file.
    policy = unbinding_policy_from_settings(settings)
    assert policy.by_merchant == {"M-1": False} and policy.default is True

    # The merchant-events worker: every referenced file must hold a valid secret; an unreadable one is named.
    with pytest.raises(ConfigError) as caught:
        merchant_registry_from_settings(settings)
    assert str(caught.value) == (f"AUTHNOTIFY_MERCHANTS_FILE={registry_path}: [merchants.\"M-1\"] secret: "
                                 f"cannot read {tmp_path}/absent (No such file or directory)")
    registry_path.write_text(registry_path.read_text().replace(f"@{tmp_path}/absent", f"@{secret_file}"))
    registry = merchant_registry_from_settings(settings)
    assert registry.default is not None and registry.default.secrets == (secret, old)
    assert registry.entries["M-1"].secrets == (secret,)

    # A file holding something else is refused like an inline value, without showing what it holds.
    secret_file.write_text("not-a-secret-but-private\n")
    with pytest.raises(ConfigError, match=r"\[merchants.default\] secrets\[1\] must be whsec_") as caught:
        merchant_registry_from_settings(settings)
    assert "not-a-secret" not in str(caught.value) and "\n" not in str(caught.value)


def test_every_listed_secret_signs_so_a_merchant_verifying_with_either_accepts() -> None:
    new, old = generate_secret(), generate_secret()
    endpoint = Endpoint("default", "https://x.example", (new, old))
    event = event_for()
    payload = event.to_json()
    headers = signed_headers(endpoint, event.id, payload)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert all(part.startswith("v1,") for part in headers["webhook-signature"].split(" "))
    for secret in (new, old):  # the merchant's side, mid-rotation, knows one of them
        Webhook(secret).verify(payload, headers)
    with pytest.raises(Exception):  # noqa: B017 - any verification failure will do
        Webhook(generate_secret()).verify(payload, headers)


async def test_merchant_events_worker_requires_the_merchants_file(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    with pytest.raises(ConfigError, match="^AUTHNOTIFY_MERCHANTS_FILE: required by the merchant-events worker"):
        merchant_registry_from_settings(settings)
    resources = Resources(settings)
    try:
        with pytest.raises(ConfigError, match="AUTHNOTIFY_MERCHANTS_FILE"):
            await merchant_events.consumer(resources)
    finally:
        await resources.aclose()


# --- the sandbox endpoint and the handler ----------------------------------------------------------


@pytest.fixture
async def endpoints() -> AsyncIterator[Callable[..., Any]]:
    started: list[RunningMerchantEndpoint] = []

    async def start(secret: str | None = None) -> RunningMerchantEndpoint:
        running = await start_merchant_endpoint(secret or generate_secret())
        started.append(running)
        return running

    yield start
    for running in started:
        await running.aclose()


async def test_sandbox_endpoint_refuses_a_wrong_signature(endpoints: Callable[..., Any]) -> None:
    running = await endpoints()
    event = event_for()
    payload = event.to_json()
    wrong = Endpoint("default", running.url_for(), (generate_secret(),))
    async with aiohttp.ClientSession() as http:
        async with http.post(running.url_for(), data=payload, headers=signed_headers(wrong, event.id, payload)) as r:
            assert r.status == 401
        garbled = {**signed_headers(wrong, event.id, payload), "webhook-signature": "garbage"}
        async with http.post(running.url_for(), data=payload, headers=garbled) as r:
            assert r.status == 401
        async with http.post(running.url_for(), data=payload) as r:
            assert r.status == 401
    assert len(running.endpoint.rejected) == 3 and not running.endpoint.delivered


async def test_handler_errors_say_what_the_merchant_did(
    endpoints: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await endpoints()
    endpoint = Endpoint("default", running.url_for(), (running.endpoint.secret,))
    registry = parse_merchant_registry(toml_entry("default", running.url_for(), running.endpoint.secret))
    async with aiohttp.ClientSession() as http:
        running.endpoint.fail(1, status=503)
        with pytest.raises(TransientError, match="^merchant 'default' answered HTTP 503$"):
            await handle_merchant_event(event_for(), context(), registry=registry, http=http)

        monkeypatch.setattr(merchant_events, "DELIVERY_TIMEOUT_SECONDS", 0.2)
        running.endpoint.delay_seconds = 1.0
        with pytest.raises(TransientError, match="did not answer within 0.2 s"):
            await handle_merchant_event(event_for(), context(), registry=registry, http=http)
        running.endpoint.delay_seconds = 0

        closed = await endpoints(endpoint.secrets[0])
        url = closed.url_for()
        await closed.aclose()
        unreachable = parse_merchant_registry(toml_entry("default", url, endpoint.secrets[0]))
        with pytest.raises(TransientError, match="^merchant 'default' unreachable"):
            await handle_merchant_event(event_for(), context(), registry=unreachable, http=http)

        only_m1 = parse_merchant_registry(toml_entry("M-1", running.url_for(), endpoint.secrets[0]))
        with pytest.raises(PermanentError, match="referenceMerchantId 'M-9' or authClientId 'C-9'"):
            await handle_merchant_event(event_for(merchant="M-9", client="C-9"), context(), registry=only_m1, http=http)


async def test_a_merchant_answering_for_ever_is_read_64_kib_and_cut_off(endpoints: Callable[..., Any]) -> None:
    """Issue 4: a 200 answer of 400 MB was read whole and took the worker to 886 MiB."""
    import asyncio

    from aiohttp import web

    written = {"bytes": 0, "ended": asyncio.Event()}

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            while written["bytes"] < 400 * 1024 * 1024:
                await response.write(chunk)
                written["bytes"] += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            written["ended"].set()
        return response

    app = web.Application()
    app.router.add_post("/hooks", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    secret = generate_secret()
    registry = parse_merchant_registry(toml_entry("default", f"http://{host}:{port}/hooks", secret))
    import structlog

    try:
        async with aiohttp.ClientSession() as http:
            with structlog.contextvars.bound_contextvars():
                async with asyncio.timeout(10):
                    await handle_merchant_event(event_for(), context(), registry=registry, http=http)
                read = structlog.contextvars.get_contextvars()["answer_bytes_read"]
            await asyncio.wait_for(written["ended"].wait(), 10)  # the connection was dropped, not drained
    finally:
        await runner.cleanup()
    assert read <= merchant_events.MAX_ANSWER_BYTES + 1
    assert written["bytes"] < 32 * 1024 * 1024  # what the socket buffers took, not the 400 MB


# --- the worker on the real broker -----------------------------------------------------------------


def write_registry(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"merchants-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return path


async def test_event_is_delivered_signed_and_verified_by_the_merchant(
    make_settings: Callable[..., Settings], amqp_connection: aio_pika.abc.AbstractConnection,
    endpoints: Callable[..., Any], tmp_path: Path,
) -> None:
    merchant = await endpoints()
    settings = make_settings(
        merchants_file=write_registry(tmp_path, toml_entry("default", merchant.url_for("/hooks"), merchant.endpoint.secret)),
        retry_delays=FAST_RETRIES,
    )
    channel = await amqp_connection.channel(publisher_confirms=True)
    await declare(channel, settings)
    event = event_for()
    async with running_workers(settings, "merchant-events"):
        await publish_event(channel, settings, event)
        delivered = await merchant.endpoint.wait_for_delivered(1)
    request = delivered[0]
    assert request.path == "/hooks"
    assert request.headers["webhook-id"] == event.id
    assert request.headers["content-type"] == "application/json"
    assert request.body == event.to_json()
    assert request.event["data"]["accessTokenFingerprint"] == event.data.accessTokenFingerprint
    # The merchant's own check, independent of the sandbox: Standard Webhooks verification passes.
    Webhook(merchant.endpoint.secret).verify(request.body, request.headers)
    assert request.headers["webhook-signature"].startswith("v1,")


async def test_events_are_routed_by_reference_merchant_id_then_auth_client_id_then_default(
    make_settings: Callable[..., Settings], amqp_connection: aio_pika.abc.AbstractConnection,
    endpoints: Callable[..., Any], tmp_path: Path,
) -> None:
    by_merchant, by_client, default = await endpoints(), await endpoints(), await endpoints()
    registry = (
        toml_entry("M-1", by_merchant.url_for(), by_merchant.endpoint.secret)
        + toml_entry("C-2", by_client.url_for(), by_client.endpoint.secret)
        + toml_entry("default", default.url_for(), default.endpoint.secret)
    )
    settings = make_settings(merchants_file=write_registry(tmp_path, registry), retry_delays=FAST_RETRIES)
    channel = await amqp_connection.channel(publisher_confirms=True)
    await declare(channel, settings)
    first = event_for(merchant="M-1", client="C-2")  # referenceMerchantId wins over authClientId
    second = event_for(merchant="M-unknown", client="C-2")
    third = event_for(merchant=None, client="C-2", provider="ams")  # AMS has only authClientId
    fourth = event_for(merchant="M-unknown", client="C-unknown")
    async with running_workers(settings, "merchant-events"):
        for event in (first, second, third, fourth):
            await publish_event(channel, settings, event)
        await by_merchant.endpoint.wait_for_delivered(1)
        await by_client.endpoint.wait_for_delivered(2)
        await default.endpoint.wait_for_delivered(1)
    assert [r.webhook_id for r in by_merchant.endpoint.delivered] == [first.id]
    assert sorted(r.webhook_id for r in by_client.endpoint.delivered) == sorted([second.id, third.id])
    assert [r.webhook_id for r in default.endpoint.delivered] == [fourth.id]


async def test_events_filter_drops_other_types_and_acknowledges_them(
    make_settings: Callable[..., Settings], amqp_connection: aio_pika.abc.AbstractConnection,
    endpoints: Callable[..., Any], tmp_path: Path,
) -> None:
    merchant, default = await endpoints(), await endpoints()
    registry = (
        toml_entry("M-1", merchant.url_for(), merchant.endpoint.secret, ["authorization.canceled"])
        + toml_entry("default", default.url_for(), default.endpoint.secret)
    )
    settings = make_settings(merchants_file=write_registry(tmp_path, registry), retry_delays=FAST_RETRIES)
    channel = await amqp_connection.channel(publisher_confirms=True)
    await declare(channel, settings)
    activated = event_for(merchant="M-1", event_type="authorization.activated")
    canceled = event_for(merchant="M-1", event_type="authorization.canceled")
    ok_before = metric(PROCESSED, queue="merchant-events", outcome="ok")
    filtered_before = metric(DELIVERIES, merchant="M-1", outcome="filtered")
    async with running_workers(settings, "merchant-events"):
        await publish_event(channel, settings, activated)
        await publish_event(channel, settings, canceled)

        async def both_acked() -> bool:
            return metric(PROCESSED, queue="merchant-events", outcome="ok") - ok_before >= 2

        await eventually(both_acked, what="both events acknowledged")
    assert [r.webhook_id for r in merchant.endpoint.delivered] == [canceled.id]
    assert default.endpoint.requests == []  # a filtered event does not fall through to the default
    assert metric(DELIVERIES, merchant="M-1", outcome="filtered") - filtered_before == 1
    topology = build_topology(settings)
    assert await take_all(channel, topology.dead_letter_queue(Consumer.MERCHANT_EVENTS)) == []


async def test_failing_merchant_is_retried_with_the_same_webhook_id_then_dead_lettered_and_replayed(
    make_settings: Callable[..., Settings], amqp_connection: aio_pika.abc.AbstractConnection,
    endpoints: Callable[..., Any], tmp_path: Path,
) -> None:
    merchant = await endpoints()
    settings = make_settings(
        merchants_file=write_registry(tmp_path, toml_entry("default", merchant.url_for(), merchant.endpoint.secret)),
        retry_delays=FAST_RETRIES,
    )
    topology = build_topology(settings)
    channel = await amqp_connection.channel(publisher_confirms=True)
    await declare(channel, settings)
    event = event_for()
    merchant.endpoint.fail(3, status=503)  # every attempt: 1 + 2 retries
    async with running_workers(settings, "merchant-events"):
        await publish_event(channel, settings, event)
        [dead] = await take_messages(channel, topology.dead_letter_queue(Consumer.MERCHANT_EVENTS), 1)
        assert [r.status for r in merchant.endpoint.requests] == [503, 503, 503]
        assert {r.webhook_id for r in merchant.endpoint.requests} == {event.id}
        assert all(r.verified for r in merchant.endpoint.requests)
        assert dead.body == event.to_json()
        assert dead.message_id == event.id
        assert dead.headers[h.DEAD_REASON] == "merchant 'default' answered HTTP 503"
        assert dead.headers[h.DEAD_ATTEMPTS] == 3
        assert dead.headers[h.DEAD_QUEUE] == "merchant-events"

        # What `dlq replay` does: back to the consumer queue, attempt 1, the death in the history.
        headers = {k: v for k, v in dead.headers.items() if not k.startswith("authnotify-dead-")}
        headers.update({h.ATTEMPT: 1, h.REPLAYED: 1, h.HISTORY: orjson.dumps([{"reason": dead.headers[h.DEAD_REASON]}]).decode()})
        await channel.default_exchange.publish(
            aio_pika.Message(dead.body, headers=headers, message_id=dead.message_id,
                             content_type=dead.content_type, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=topology.consumer_queue(Consumer.MERCHANT_EVENTS),
        )
        [delivered] = await merchant.endpoint.wait_for_delivered(1)
    assert delivered.webhook_id == event.id
    assert delivered.body == event.to_json()


async def test_transient_failures_then_success_deliver_once(
    make_settings: Callable[..., Settings], amqp_connection: aio_pika.abc.AbstractConnection,
    endpoints: Callable[..., Any], tmp_path: Path,
) -> None:
    merchant = await endpoints()
    settings = make_settings(
        merchants_file=write_registry(tmp_path, toml_entry("default", merchant.url_for(), merchant.endpoint.secret)),
        retry_delays=FAST_RETRIES,
    )
    channel = await amqp_connection.channel(publisher_confirms=True)
    await declare(channel, settings)
    event = event_for()
    merchant.endpoint.fail(2, status=500)
    async with running_workers(settings, "merchant-events"):
        await publish_event(channel, settings, event)
        await merchant.endpoint.wait_for_delivered(1)
    assert [r.status for r in merchant.endpoint.requests] == [500, 500, 204]
    assert {r.webhook_id for r in merchant.endpoint.requests} == {event.id}
    timestamps = [int(r.headers["webhook-timestamp"]) for r in merchant.endpoint.requests]
    assert timestamps == sorted(timestamps)  # each attempt signs with its own, current timestamp


async def test_event_without_endpoint_or_with_a_bad_body_is_dead_lettered_at_once(
    make_settings: Callable[..., Settings], amqp_connection: aio_pika.abc.AbstractConnection,
    endpoints: Callable[..., Any], tmp_path: Path,
) -> None:
    merchant = await endpoints()
    settings = make_settings(
        merchants_file=write_registry(tmp_path, toml_entry("M-1", merchant.url_for(), merchant.endpoint.secret)),
        retry_delays=FAST_RETRIES,
    )
    topology = build_topology(settings)
    channel = await amqp_connection.channel(publisher_confirms=True)
    await declare(channel, settings)
    stray = event_for(merchant="M-9", client="C-9")
    async with running_workers(settings, "merchant-events"):
        await publish_event(channel, settings, stray)
        exchange = await channel.get_exchange(topology.notifications_exchange)
        await exchange.publish(
            aio_pika.Message(b'{"id": "msg_x", "type": "authorization.paused"}', message_id="bad-1",
                             headers={h.ATTEMPT: 1}),
            routing_key="event.authorization.paused",
        )
        dead = await take_messages(channel, topology.dead_letter_queue(Consumer.MERCHANT_EVENTS), 2)
    reasons = {m.message_id: m.headers[h.DEAD_REASON] for m in dead}
    assert reasons[stray.id] == (
        "no merchant endpoint for referenceMerchantId 'M-9' or authClientId 'C-9', "
        "and no [merchants.default] in the merchant registry"
    )
    assert reasons["bad-1"].startswith("not a merchant event: ")
    assert all(m.headers[h.DEAD_ATTEMPTS] == 1 for m in dead)
    assert merchant.endpoint.requests == []


def test_an_entry_with_an_events_filter_keeps_its_secrets() -> None:
    secret = generate_secret()
    registry = parse_merchant_registry(toml_entry("M-1", "https://x.example", secret, ["authorization.canceled"]))
    assert registry.entries["M-1"].secrets == (secret,)


# --- the merchant circuit ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail_once(circuits: MerchantCircuits, merchant: str, reason: str = "merchant answered HTTP 503") -> None:
    with pytest.raises(TransientError), circuits.attempt(merchant):
        raise TransientError(reason)


def circuit_gauge(merchant: str) -> float:
    return metric("authnotify_merchant_circuit_open", merchant=merchant)


def test_the_circuit_opens_after_n_consecutive_failures_and_holds_the_merchant_back_without_attempting() -> None:
    merchant, other = f"M-{uuid.uuid4().hex[:6]}", f"M-{uuid.uuid4().hex[:6]}"
    clock = Clock()
    circuits = MerchantCircuits(3, probe_interval=5.0, clock=clock)
    fail_once(circuits, merchant)
    fail_once(circuits, merchant)
    with circuits.attempt(merchant):  # a success in between starts the count again
        pass
    fail_once(circuits, merchant)
    fail_once(circuits, merchant)
    assert not circuits.is_open(merchant)
    fail_once(circuits, merchant, "merchant did not answer within 15 s")
    assert circuits.is_open(merchant) and circuit_gauge(merchant) == 1

    attempted = []
    with pytest.raises(CircuitOpen) as refused, circuits.attempt(merchant):
        attempted.append(merchant)
    assert attempted == []  # not attempted at all
    assert isinstance(refused.value, TransientError)  # so it is retried after its delay, like any failure
    assert str(refused.value) == (f"merchant {merchant!r} not attempted: its circuit is open after 3 consecutive "
                                  "failed deliveries (last: merchant did not answer within 15 s)")
    with circuits.attempt(other):  # every other merchant is let through as before
        attempted.append(other)
    assert attempted == [other] and circuit_gauge(other) == 0


def test_an_open_circuit_lets_one_probe_through_per_interval_and_one_success_closes_it() -> None:
    merchant = f"M-{uuid.uuid4().hex[:6]}"
    clock = Clock()
    circuits = MerchantCircuits(2, probe_interval=5.0, clock=clock)
    fail_once(circuits, merchant)
    fail_once(circuits, merchant)
    clock.now += 4.9
    with pytest.raises(CircuitOpen), circuits.attempt(merchant):
        pass
    clock.now += 0.1
    with pytest.raises(TransientError), circuits.attempt(merchant):  # the probe goes through...
        with pytest.raises(CircuitOpen), circuits.attempt(merchant):  # ...alone: one in flight at a time
            pass
        raise TransientError("merchant answered HTTP 502")  # ...and fails: open for another interval
    assert circuits.is_open(merchant)
    clock.now += 4.9
    with pytest.raises(CircuitOpen, match="after 3 consecutive failed deliveries .last: merchant answered HTTP 502"):
        with circuits.attempt(merchant):
            pass
    clock.now += 0.1
    with circuits.attempt(merchant):  # the next probe succeeds: closed
        pass
    assert not circuits.is_open(merchant) and circuit_gauge(merchant) == 0
    for _ in range(3):
        with circuits.attempt(merchant):
            pass


def test_a_cancelled_probe_counts_as_neither_and_frees_the_probe_slot() -> None:
    import asyncio

    merchant = f"M-{uuid.uuid4().hex[:6]}"
    clock = Clock()
    circuits = MerchantCircuits(1, probe_interval=1.0, clock=clock)
    fail_once(circuits, merchant)
    clock.now += 1.0
    with pytest.raises(asyncio.CancelledError), circuits.attempt(merchant):
        raise asyncio.CancelledError
    assert circuits.is_open(merchant)
    with circuits.attempt(merchant):  # the slot is free again, and the interval was not restarted
        pass
    assert not circuits.is_open(merchant)


def test_zero_failures_turns_the_circuit_off() -> None:
    merchant = f"M-{uuid.uuid4().hex[:6]}"
    circuits = MerchantCircuits(0, probe_interval=1.0)
    for _ in range(50):
        fail_once(circuits, merchant)
    assert not circuits.is_open(merchant)


def test_the_probe_interval_is_the_shortest_merchant_events_delay(offline_settings: Callable[..., Settings]) -> None:
    circuits = merchant_circuits_from_settings(offline_settings(retry_delays_merchant_events="30s,2s,1m"))
    assert (circuits.failures_to_open, circuits.probe_interval) == (5, 2.0)
    default = merchant_circuits_from_settings(offline_settings(retry_delays=None, merchant_circuit_failures=7))
    assert (default.failures_to_open, default.probe_interval) == (7, 5.0)


async def test_the_handler_does_not_call_a_merchant_whose_circuit_is_open_and_counts_it(
    endpoints: Callable[..., Any],
) -> None:
    running = await endpoints()
    name = f"M-{uuid.uuid4().hex[:6]}"
    registry = parse_merchant_registry(toml_entry(name, running.url_for(), running.endpoint.secret))
    circuits = MerchantCircuits(2, probe_interval=60.0)
    running.endpoint.fail(2, status=503)
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            with pytest.raises(TransientError, match="answered HTTP 503"):
                await handle_merchant_event(event_for(merchant=name), context(), registry=registry, http=http,
                                            circuits=circuits)
        with pytest.raises(CircuitOpen):
            await handle_merchant_event(event_for(merchant=name), context(), registry=registry, http=http,
                                        circuits=circuits)
    assert len(running.endpoint.requests) == 2
    assert metric(DELIVERIES, merchant=name, outcome="failed") == 2
    assert metric(DELIVERIES, merchant=name, outcome="circuit_open") == 1
    assert metric("authnotify_merchant_delivery_seconds_count", merchant=name) == 2


class HangingMerchant:
    """A merchant endpoint that is down the slow way: it takes every request and answers nothing until it
    is brought back (then 204, verified). Records each request as it arrives."""

    def __init__(self) -> None:
        from aiohttp import web

        self.secret = generate_secret()
        self.arrivals: list[str] = []  # webhook ids, in the order requests arrived
        self.delivered: list[str] = []
        self.back = asyncio.Event()
        self._app = web.Application()
        self._app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=1)
        self.url = ""

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        Webhook(self.secret).verify(body, dict(request.headers))
        self.arrivals.append(request.headers["webhook-id"])
        try:
            await asyncio.wait_for(self.back.wait(), 30)
        except TimeoutError:
            return web.Response(status=503)
        if request.transport is None or request.transport.is_closing():
            return web.Response(status=503)  # arrived while down: the sender has given up on it
        self.delivered.append(request.headers["webhook-id"])
        return web.Response(status=204)

    async def start(self) -> None:
        from aiohttp import web

        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/hooks"

    async def stop(self) -> None:
        self.back.set()
        await self._runner.cleanup()


@pytest.mark.slow
async def test_a_merchant_that_is_down_holds_up_no_other_and_gets_its_events_once_it_is_back(
    make_settings: Callable[..., Settings], amqp_connection: aio_pika.abc.AbstractConnection,
    endpoints: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One merchant's endpoint hangs (each delivery times out), the other answers: the other's events are
    all delivered while the circuit holds the first one's back (a probe a second at most, not a slot per
    event), and once the first one is back, every one of its events arrives, once."""
    monkeypatch.setattr(merchant_events, "DELIVERY_TIMEOUT_SECONDS", 1.0)
    down_name, up_name = f"M-DOWN-{uuid.uuid4().hex[:6]}", f"M-UP-{uuid.uuid4().hex[:6]}"
    down = HangingMerchant()
    await down.start()
    up = await endpoints()
    settings = make_settings(
        merchants_file=write_registry(tmp_path, toml_entry(down_name, down.url, down.secret)
                                      + toml_entry(up_name, up.url_for(), up.endpoint.secret)),
        retry_delays_merchant_events=",".join(["1s"] * 30), merchant_circuit_failures=3,
    )
    channel = await amqp_connection.channel(publisher_confirms=True)
    await declare(channel, settings)
    first = [event_for(merchant=down_name) for _ in range(3)]
    held = [event_for(merchant=down_name) for _ in range(30)]
    flowing = [event_for(merchant=up_name) for _ in range(30)]
    try:
        async with running_workers(settings, "merchant-events"):
            for event in first:  # three deliveries that time out: the circuit opens
                await publish_event(channel, settings, event)

            async def circuit_open() -> bool:
                return circuit_gauge(down_name) == 1

            await eventually(circuit_open, what="the down merchant's circuit to open")
            assert sorted(down.arrivals) == sorted(e.id for e in first)

            arrived_before, opened = len(down.arrivals), time.monotonic()
            for down_event, up_event in zip(held, flowing, strict=True):
                await publish_event(channel, settings, down_event)
                await publish_event(channel, settings, up_event)
            await up.endpoint.wait_for_delivered(len(flowing), timeout=20)
            seconds_open = time.monotonic() - opened
            # While open: a probe per interval (1 s here) at most, not one request (and one slot) per event.
            probes = len(down.arrivals) - arrived_before
            assert probes <= 1 + seconds_open / 1.0, (probes, seconds_open)
            assert metric(DELIVERIES, merchant=down_name, outcome="circuit_open") >= len(held) - probes
            assert circuit_gauge(down_name) == 1

            down.back.set()  # the merchant is back: the next probe closes the circuit, the retries arrive

            async def all_delivered() -> bool:
                return set(down.delivered) == {e.id for e in first + held}

            await eventually(all_delivered, timeout=30, what="the held events to reach the merchant once back")
            async def circuit_closed() -> bool:
                return circuit_gauge(down_name) == 0

            await eventually(circuit_closed, what="the circuit to close")
        assert sorted(r.webhook_id for r in up.endpoint.delivered) == sorted(e.id for e in flowing)  # each once
        assert len(down.delivered) == len(first) + len(held)  # each once
        topology = build_topology(settings)
        assert await take_all(channel, topology.dead_letter_queue(Consumer.MERCHANT_EVENTS)) == []
    finally:
        await down.stop()
