"""``GET /v1/dlq``, ``POST /v1/dlq/replay`` and ``GET /v1/queues`` against the real broker: the API process's
own connection, the same listing and replay as ``authnotify dlq``, the same filters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from authnotify.api.app import create_api_app
from authnotify.api.keys import new_api_key, parse_api_keys
from authnotify.messaging.connection import Broker
from authnotify.messaging.publisher import ConfirmedPublisher
from authnotify.messaging.queue_stats import BrokerMetrics
from authnotify.messaging.topology import Consumer, build_topology, declare_topology
from authnotify.operations.deadletters import OperatorQueues
from authnotify.store.memory import InMemoryStore
from tests.test_dlq import drain, event_body, put_dead

KEY = new_api_key("ops", ["dlq:read", "dlq:write"])
HEADERS = {"Authorization": f"Bearer {KEY.key}"}


@pytest.fixture
async def setup(make_settings: Any, amqp_connection: Any) -> tuple[Any, Any]:
    """The test's settings and its topology, declared."""
    settings = make_settings(retry_delays="200ms,400ms")
    topology = build_topology(settings)
    channel = await amqp_connection.channel()
    await declare_topology(channel, topology)
    await channel.close()
    return settings, topology


@pytest.fixture
async def metrics_node(setup: Any) -> AsyncIterator[str]:
    """RabbitMQ's Prometheus endpoint, played: 2 unacknowledged in merchant-events (this machine's broker has
    no rabbitmq_prometheus plugin; its figures for ready and consumers are the real ones)."""
    settings, topology = setup
    text = ("# TYPE rabbitmq_detailed_queue_messages_unacked gauge\n"
            f'rabbitmq_detailed_queue_messages_unacked{{vhost="/",queue="{topology.consumer_queue("merchant-events")}"}} 2\n')

    async def detailed(_request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics/detailed", detailed)
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url(""))
    await server.close()


@pytest.fixture
async def api(setup: Any, metrics_node: str) -> AsyncIterator[TestClient]:
    settings, topology = setup
    broker = Broker(settings.broker_url(), topology, connection_name="test-api")
    publisher = ConfirmedPublisher(broker, name="api", confirm_timeout=5.0)
    await publisher.wait_ready(20)
    queues = OperatorQueues(broker, build_topology(settings), BrokerMetrics([metrics_node], "/"))
    client = TestClient(TestServer(create_api_app(InMemoryStore(), publisher, topology,
                                                  parse_api_keys(KEY.toml_entry()), operator_queues=queues)))
    await client.start_server()
    yield client
    await client.close()
    await publisher.close()
    await broker.close()


async def test_list_filters_and_replay_by_ids_or_all_through_the_api(setup: Any, amqp_connection: Any,
                                                                     api: TestClient) -> None:
    settings, topology = setup
    early = await put_dead(amqp_connection, topology, Consumer.MERCHANT_EVENTS, 2, reason="merchant answered 503",
                           dead_at="2026-11-23T08:00:00.000Z", body=event_body("M-1"))
    late = await put_dead(amqp_connection, topology, Consumer.MERCHANT_EVENTS, 3, reason="merchant answered 503",
                          dead_at="2026-11-23T09:30:00.000Z", body=event_body("M-1"))
    other = await put_dead(amqp_connection, topology, Consumer.MERCHANT_EVENTS, 1, dead_at="2026-11-23T09:30:00.000Z",
                           reason="merchant timed out", body=event_body("M-2"))
    code = await put_dead(amqp_connection, topology, Consumer.AUTHCODE_CREATED, 1)

    listed = await (await api.get("/v1/dlq", headers=HEADERS)).json()
    assert [item["id"] for item in listed["items"]] == code + early + late + other and listed["more"] is False
    assert listed["items"][0] == {"id": code[0], "queue": "authcode-created", "provider": "ams",
                                  "notifyType": "AUTHCODE_CREATED", "attempts": 3,
                                  "reason": "applyToken answered F: INVALID_CODE",
                                  "deadLetteredAt": "2026-11-23T10:00:05.000Z", "merchant": None}
    narrowed = await (await api.get("/v1/dlq", params={"queue": "merchant-events", "merchant": "M-1",
                                                       "since": "2026-11-23T09:00:00Z", "limit": "2"},
                                    headers=HEADERS)).json()
    assert [item["id"] for item in narrowed["items"]] == late[:2] and narrowed["more"] is True
    exactly = await (await api.get("/v1/dlq", params={"queue": "merchant-events", "merchant": "M-1",
                                                      "since": "2026-11-23T09:00:00Z", "limit": "3"},
                                   headers=HEADERS)).json()
    assert [item["id"] for item in exactly["items"]] == late and exactly["more"] is False  # all there were
    by_reason = await (await api.get("/v1/dlq", params={"reason": "INVALID_code"}, headers=HEADERS)).json()
    assert [item["id"] for item in by_reason["items"]] == code

    one = await api.post("/v1/dlq/replay", json={"queue": "merchant-events", "ids": [early[0], "gone"]},
                         headers=HEADERS)
    assert one.status == 200 and await one.json() == {"replayed": 1, "notFound": ["gone"]}
    everything = await api.post("/v1/dlq/replay", json={"queue": "merchant-events", "all": True, "merchant": "M-1",
                                                        "since": "2026-11-23T09:00"}, headers=HEADERS)
    assert await everything.json() == {"replayed": 3, "notFound": []}
    moved = await drain(amqp_connection, topology.consumer_queue(Consumer.MERCHANT_EVENTS))
    assert [m.message_id for m in moved] == [early[0], *late]
    left = await (await api.get("/v1/dlq", headers=HEADERS)).json()
    assert [item["id"] for item in left["items"]] == code + [early[1]] + other


async def test_queues_give_ready_unacknowledged_and_consumers(setup: Any, amqp_connection: Any,
                                                              api: TestClient) -> None:
    settings, topology = setup
    await put_dead(amqp_connection, topology, Consumer.TOKEN_CANCELED, 2)
    channel = await amqp_connection.channel()
    queue = await channel.get_queue(topology.consumer_queue(Consumer.TOKEN_CREATED), ensure=False)
    await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue.name)
    async def hold(_message: Any) -> None:  # a consumer holding what it gets
        await asyncio.sleep(0)

    tag = await queue.consume(hold, no_ack=False)
    try:
        answer = await (await api.get("/v1/queues", headers=HEADERS)).json()
    finally:
        await queue.cancel(tag)
        await channel.close()
    figures = {entry["name"]: entry for entry in answer["queues"]}
    assert set(figures) == set(topology.all_queue_names())
    created = figures[topology.consumer_queue(Consumer.TOKEN_CREATED)]
    assert created["consumer"] == "token-created" and created["kind"] == "consumer" and created["consumers"] == 1
    dead = figures[topology.dead_letter_queue(Consumer.TOKEN_CANCELED)]
    assert (dead["kind"], dead["ready"], dead["consumers"]) == ("dead-letter", 2, 0)
    assert figures[topology.consumer_queue(Consumer.MERCHANT_EVENTS)]["unacknowledged"] == 2
    assert created["unacknowledged"] is None  # the endpoint did not report it: unknown, not zero
    assert figures[topology.unrouted_queue]["kind"] == "unrouted"
    retry = [entry for entry in answer["queues"] if entry["kind"] == "retry"]
    assert retry and all(entry["consumer"] for entry in retry)
