"""The dead-letter filters (merchant, since, reason) and the queue figures' unacknowledged counts, as logic:
the one filter ``authnotify dlq`` and the API share, the parsing of what operators type, and RabbitMQ's
Prometheus endpoint played by a local server. Against the real broker: tests/test_dlq.py and
tests/test_api_dead_letters.py."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from authnotify.config.values import parse_instant
from authnotify.errors import ConfigError
from authnotify.messaging.deadletters import DeadLetter, DeadLetterFilter, Selection, merchant_of
from authnotify.messaging.queue_stats import BrokerMetrics
from authnotify.operations.authorizations import InvalidRequest
from authnotify.operations.deadletters import consumer_names, dead_letter_filter, list_limit
from tests.certificates import make_test_certificates


def letter(merchant: str | None = "M-1", reason: str | None = "merchant answered HTTP 503",
           at: str | None = "2026-11-23T10:00:05.000Z", id: str = "m1") -> DeadLetter:
    return DeadLetter(id=id, queue="merchant-events", provider="aps", notifyType="authorization.activated",
                      attempts=8, reason=reason, deadLetteredAt=at, merchant=merchant)


def test_the_merchant_is_the_reference_merchant_id_else_the_auth_client_id_from_any_body() -> None:
    notification = {"authorizationNotifyType": "TOKEN_CREATED", "authClientId": "2188", "referenceMerchantId": "M-1"}
    assert merchant_of(orjson.dumps(notification)) == "M-1"
    assert merchant_of(orjson.dumps({**notification, "referenceMerchantId": None})) == "2188"
    assert merchant_of(orjson.dumps({"id": "msg_1", "type": "authorization.canceled",
                                     "data": {"authClientId": "2188", "referenceMerchantId": "M-9"}})) == "M-9"
    assert merchant_of(orjson.dumps({"data": {"authClientId": "2188"}})) == "2188"
    for body in (b"", b"not json", b"[1, 2]", b'"text"', b'{"authorizationId": "auth_1"}', b'{"referenceMerchantId": 5}',
                 b'{"data": "x"}', b"\xff\xfe"):
        assert merchant_of(body) is None, body


def test_filters_combine_and_each_means_what_the_operator_typed() -> None:
    nine = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    assert DeadLetterFilter().matches(letter()) and DeadLetterFilter().empty
    assert DeadLetterFilter(merchant="M-1").matches(letter())
    assert not DeadLetterFilter(merchant="M-2").matches(letter())
    assert not DeadLetterFilter(merchant="M-1").matches(letter(merchant=None))
    assert DeadLetterFilter(since=nine).matches(letter())
    assert DeadLetterFilter(since=datetime(2026, 11, 23, 10, 0, 5, tzinfo=UTC)).matches(letter())  # at: included
    assert not DeadLetterFilter(since=datetime(2026, 11, 23, 10, 0, 6, tzinfo=UTC)).matches(letter())
    assert not DeadLetterFilter(since=nine).matches(letter(at=None))  # unknown time: not "since" anything
    assert not DeadLetterFilter(since=nine).matches(letter(at="garbage"))
    assert DeadLetterFilter(since=nine.astimezone(timezone(timedelta(hours=8)))).matches(letter())
    assert DeadLetterFilter(reason="http 503").matches(letter())
    assert not DeadLetterFilter(reason="timeout").matches(letter())
    assert not DeadLetterFilter(reason="x").matches(letter(reason=None))
    both = DeadLetterFilter(merchant="M-1", since=nine, reason="503")
    assert both.matches(letter()) and not both.matches(letter(merchant="M-2"))
    with pytest.raises(ValueError):
        DeadLetterFilter(since=datetime(2026, 11, 23))


def test_a_selection_takes_ids_that_match_the_filter_up_to_its_limit() -> None:
    selection = Selection(["a", "b"], limit=None, filter=DeadLetterFilter(merchant="M-1"))
    assert selection.wants(letter(id="a")) and not selection.wants(letter(id="c"))
    assert not selection.wants(letter(id="b", merchant="M-2"))
    limited = Selection(limit=1)
    assert limited.wants(letter())
    limited.taken = 1
    assert limited.full and not limited.wants(letter())


def test_times_are_iso_8601_and_utc_without_an_offset() -> None:
    assert parse_instant("2026-11-23T09:00:00Z") == datetime(2026, 11, 23, 9, tzinfo=UTC)
    assert parse_instant("2026-11-23T09:00") == datetime(2026, 11, 23, 9, tzinfo=UTC)
    assert parse_instant("2026-11-23") == datetime(2026, 11, 23, tzinfo=UTC)
    assert parse_instant(" 2026-11-23T17:00:00+08:00 ") == datetime(2026, 11, 23, 9, tzinfo=UTC)
    for text in ("yesterday", "09:00", "", "2026-13-01"):
        with pytest.raises(ValueError, match="ISO 8601"):
            parse_instant(text)


def test_request_values_are_checked_with_the_parameter_named() -> None:
    assert consumer_names(["merchant-events", "merchant-events"]) == ["merchant-events"]
    assert consumer_names([]) == []
    with pytest.raises(InvalidRequest, match="queue: 'x' is not a consumer"):
        consumer_names(["x"])
    chosen = dead_letter_filter(merchant="M-1", since="2026-11-23T09:00", reason="")
    assert chosen == DeadLetterFilter(merchant="M-1", since=datetime(2026, 11, 23, 9, tzinfo=UTC), reason=None)
    assert dead_letter_filter(merchant="", since="", reason="").empty
    with pytest.raises(InvalidRequest, match="since"):
        dead_letter_filter(since="soon")
    with pytest.raises(InvalidRequest, match="reason"):
        dead_letter_filter(reason="r" * 257)
    assert list_limit(None) == 100 and list_limit("7") == 7
    for bad in ("0", "1001", "seven"):
        with pytest.raises(InvalidRequest, match="limit"):
            list_limit(bad)


# --- unacknowledged messages from RabbitMQ's Prometheus endpoint --------------------------------------------

DETAILED = """# TYPE rabbitmq_detailed_queue_messages_ready gauge
rabbitmq_detailed_queue_messages_ready{vhost="/",queue="ns.merchant-events"} 4
# TYPE rabbitmq_detailed_queue_messages_unacked gauge
rabbitmq_detailed_queue_messages_unacked{vhost="/",queue="ns.merchant-events"} %d
rabbitmq_detailed_queue_messages_unacked{vhost="/",queue="ns.token-created"} 0
"""


class Node:
    """A RabbitMQ node's /metrics/detailed, as rabbitmq_prometheus answers it."""

    def __init__(self, unacked: int, status: int = 200) -> None:
        self.unacked = unacked
        self.status = status
        self.asked: list[dict[str, str]] = []

    def app(self) -> web.Application:
        async def detailed(request: web.Request) -> web.Response:
            self.asked.append(dict(request.query))
            if self.status != 200:
                return web.Response(status=self.status)
            return web.Response(text=DETAILED % self.unacked, content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics/detailed", detailed)
        return app


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Node, Node, list[str]]]:
    first, second = Node(3), Node(5)
    servers = [TestServer(first.app()), TestServer(second.app())]
    for server in servers:
        await server.start_server()
    yield first, second, [str(server.make_url("")) for server in servers]
    for server in servers:
        await server.close()


async def test_unacknowledged_counts_are_merged_over_the_nodes_that_answer(nodes: tuple[Node, Node, list[str]]) -> None:
    first, second, urls = nodes
    metrics = BrokerMetrics(urls, "/")
    assert await metrics.unacknowledged() == {"ns.merchant-events": 5, "ns.token-created": 0}
    assert first.asked == [{"vhost": "/", "family": "queue_coarse_metrics"}]

    second.status = 500
    assert await metrics.unacknowledged() == {"ns.merchant-events": 3, "ns.token-created": 0}
    second.status = 200
    await metrics.unacknowledged()
    assert len(second.asked) == 2  # a node that failed is left alone for a while, not asked on every page


async def test_a_tls_only_node_is_read_over_https_trusting_the_ca_its_url_names(tmp_path: Path) -> None:
    """A TLS-only broker serves its metrics on 15691 over HTTPS, with a certificate from a private CA."""
    certificates = make_test_certificates(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certificates.server_certificate, certificates.server_key)
    node = Node(7)
    runner = web.AppRunner(node.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        trusting = BrokerMetrics([f"https://localhost:{port}/?cafile={certificates.ca}"], "/")
        assert await trusting.unacknowledged() == {"ns.merchant-events": 7, "ns.token-created": 0}
        assert node.asked == [{"vhost": "/", "family": "queue_coarse_metrics"}]  # cafile is not sent
        # Another CA, or the system's: the certificate is refused and the count is unknown.
        for url in (f"https://localhost:{port}?cafile={certificates.other_ca}", f"https://localhost:{port}"):
            assert await BrokerMetrics([url], "/").unacknowledged() is None
        assert len(node.asked) == 1
    finally:
        await runner.cleanup()

    with pytest.raises(ConfigError, match=r"^AUTHNOTIFY_RABBITMQ_METRICS_URLS: cannot use the CA file .*absent"):
        BrokerMetrics([f"https://localhost:{port}?cafile={tmp_path}/absent"], "/")


async def test_no_endpoint_means_unknown_not_zero() -> None:
    metrics = BrokerMetrics(["http://127.0.0.1:1"], "/")
    assert await metrics.unacknowledged() is None
