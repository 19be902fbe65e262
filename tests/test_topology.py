"""The topology as declared on the real broker (docs/queues.md), for both queue types: where each routing
key lands, how a retry queue hands a message back, and that the broker's own dead-lettering keeps it."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest

from authnotify.messaging.topology import (
    Consumer,
    QueueType,
    Topology,
    build_topology,
    declare_topology,
    delay_label,
    event_routing_key,
    notification_routing_key,
)

WAIT_SECONDS = 15.0
pytestmark = pytest.mark.parametrize("queue_type", ["quorum", "classic"])


async def get_one(channel: aio_pika.abc.AbstractChannel, queue: str) -> aio_pika.abc.AbstractIncomingMessage:
    """Polls ``queue`` until a message is there (with a deadline), and acks it."""
    declared = await channel.get_queue(queue, ensure=False)
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while True:
        message = await declared.get(no_ack=True, fail=False)
        if message is not None:
            return message
        assert asyncio.get_running_loop().time() < deadline, f"nothing arrived in {queue}"
        await asyncio.sleep(0.05)


async def depth(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    result = await channel.declare_queue(queue, passive=True)
    return result.declaration_result.message_count or 0


async def publish(channel: aio_pika.abc.AbstractChannel, exchange: str, routing_key: str, body: bytes) -> None:
    target = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange, ensure=False)
    await target.publish(
        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=uuid.uuid4().hex),
        routing_key=routing_key, mandatory=True,
    )


@pytest.fixture
async def declared(make_settings, amqp_connection, queue_type: str) -> tuple[Topology, aio_pika.abc.AbstractChannel]:
    topology = build_topology(make_settings(queue_type=queue_type, retry_delays="200ms,1s"))
    channel = await amqp_connection.channel(publisher_confirms=True, on_return_raises=True)
    await declare_topology(channel, topology)
    await declare_topology(channel, topology)  # idempotent: same arguments, no PRECONDITION_FAILED
    return topology, channel


async def test_each_routing_key_lands_in_its_queue(declared, queue_type: str) -> None:
    topology, channel = declared
    assert topology.queue_type is QueueType(queue_type)
    expected = {
        notification_routing_key("ams", "AUTHCODE_CREATED"): topology.consumer_queue(Consumer.AUTHCODE_CREATED),
        notification_routing_key("aps", "AUTHCODE_CREATED"): topology.consumer_queue(Consumer.AUTHCODE_CREATED),
        notification_routing_key("ams", "TOKEN_CREATED"): topology.consumer_queue(Consumer.TOKEN_CREATED),
        notification_routing_key("aps", "TOKEN_CANCELED"): topology.consumer_queue(Consumer.TOKEN_CANCELED),
        event_routing_key("authorization.canceled"): topology.consumer_queue(Consumer.MERCHANT_EVENTS),
        notification_routing_key("ams", "SOMETHING_NEW"): topology.unrouted_queue,
        notification_routing_key("aps", None): topology.unrouted_queue,
    }
    assert notification_routing_key("ams", "SOMETHING_NEW") == "ams.unknown"
    for routing_key, queue in expected.items():
        body = routing_key.encode()
        await publish(channel, topology.notifications_exchange, routing_key, body)
        message = await get_one(channel, queue)
        assert (message.body, message.routing_key) == (body, routing_key)
    for queue in {*expected.values(), *(topology.dead_letter_queue(c) for c in Consumer)}:
        assert await depth(channel, queue) == 0, f"{queue} got a copy it should not have"


async def test_a_retry_queue_hands_the_message_back_after_its_delay(declared) -> None:
    topology, channel = declared
    first, second = topology.retry_steps(Consumer.TOKEN_CANCELED)
    assert first.queue.endswith(f".token-canceled.retry.{delay_label(0.2)}") and second.queue.endswith(".retry.1s")
    started = asyncio.get_running_loop().time()
    await publish(channel, "", first.queue, b"retry me")
    message = await get_one(channel, topology.consumer_queue(Consumer.TOKEN_CANCELED))
    assert message.body == b"retry me"
    assert asyncio.get_running_loop().time() - started >= 0.19
    assert await depth(channel, first.queue) == 0


async def test_a_rejected_message_is_dead_lettered_by_the_broker_with_its_history(declared) -> None:
    topology, channel = declared
    queue = topology.consumer_queue(Consumer.MERCHANT_EVENTS)
    await publish(channel, "", queue, b"poison")
    consumer_queue = await channel.get_queue(queue, ensure=False)
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while (message := await consumer_queue.get(no_ack=False, fail=False)) is None:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    await message.reject(requeue=False)
    dead = await get_one(channel, topology.dead_letter_queue(Consumer.MERCHANT_EVENTS))
    assert dead.body == b"poison"
    [death] = dead.headers["x-death"]
    assert death["reason"] == "rejected" and death["queue"] == queue


async def test_a_broker_user_that_may_not_declare_checks_the_topology_passively(queue_type: str) -> None:
    """Per-role broker users (deploy/k8s/base/broker-users.yaml) may not declare; they find the topology the
    operator's user declared. A fake channel stands in: giving the shared broker a restricted user would
    reconfigure it."""
    import aiormq.exceptions

    from authnotify.config import Settings

    class RefusingChannel:
        def __init__(self) -> None:
            self.passive: list[str] = []
            self.reopened = False

        async def declare_exchange(self, name: str, *args: object, **kwargs: object) -> None:
            raise aiormq.exceptions.ChannelAccessRefused("ACCESS_REFUSED - configure access to exchange")

        async def reopen(self) -> None:
            self.reopened = True

        async def get_exchange(self, name: str, ensure: bool = True) -> None:
            assert ensure
            self.passive.append(name)

        async def declare_queue(self, name: str, passive: bool = False, **kwargs: object) -> None:
            assert passive, f"{name} declared without permission"
            self.passive.append(name)

    topology = build_topology(Settings(_env_file=None, queue_type=queue_type))  # type: ignore[call-arg]
    channel = RefusingChannel()
    await declare_topology(channel, topology)  # type: ignore[arg-type]
    assert channel.reopened
    assert channel.passive == [spec.name for spec in topology.exchanges()] + list(topology.all_queue_names())
