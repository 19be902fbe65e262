"""Batches in the consumer runtime: messages that finish together are settled together, each with its own fate.

The acknowledgement plan and the settling run first without a broker (a fake channel that numbers deliveries
and settles them as the broker does, an in-memory publisher); then a mixed batch on the real broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aio_pika
import aiormq
import orjson
import pytest

from authnotify.config import Settings
from authnotify.domain.authorizations import AuthorizationData
from authnotify.domain.events import MerchantEvent
from authnotify.errors import PermanentError, PublishFailed, TransientError
from authnotify.messaging import headers as h
from authnotify.messaging.consumer import (
    AckFrame,
    ConsumerSpec,
    DeliveryProcessor,
    MessageContext,
    Outcome,
    plan_acknowledgements,
)
from authnotify.messaging.memory import InMemoryPublisher
from authnotify.messaging.messages import OutgoingMessage
from authnotify.messaging.topology import Consumer, Topology, build_topology
from authnotify.workers.process import Workers
from tests.fakes import FakeChannel, FakeDelivery, notification_delivery
from tests.test_runtime import FAST_RETRIES, WAIT_SECONDS, processed, queue_depth, take, wait_for


def event_for(name: str) -> MerchantEvent:
    data = AuthorizationData(provider="aps", status="active", accessTokenFingerprint=f"fp-{name}")
    return MerchantEvent.of("authorization.activated", data, datetime(2026, 1, 2, 3, 4, 5))


# --- the plan ------------------------------------------------------------------------------------------


def test_a_run_of_consecutive_successes_takes_one_multiple_ack() -> None:
    assert plan_acknowledgements([(1, True), (2, True), (3, True)], {1, 2, 3}) == [
        AckFrame(3, True, True, (1, 2, 3))]


def test_a_requeued_message_ends_the_run_and_is_nacked_in_its_place() -> None:
    assert plan_acknowledgements([(1, True), (2, True), (3, False), (4, True), (5, True)], {1, 2, 3, 4, 5}) == [
        AckFrame(2, True, True, (1, 2)),
        AckFrame(3, False, False, (3,)),
        AckFrame(5, True, True, (4, 5)),
    ]


def test_a_message_held_elsewhere_is_never_covered_by_a_multiple_ack() -> None:
    # Tag 1 belongs to a batch still being handled: acking 2-4 "up to 4" would ack it too.
    assert plan_acknowledgements([(2, True), (3, True), (4, True)], {1, 2, 3, 4}) == [
        AckFrame(2, True, False, (2,)), AckFrame(3, True, False, (3,)), AckFrame(4, True, False, (4,))]
    # Tag 5 is held elsewhere: 2-4 may still go together, 6 alone.
    assert plan_acknowledgements([(2, True), (3, True), (4, True), (6, True)], {2, 3, 4, 5, 6}) == [
        AckFrame(4, True, True, (2, 3, 4)), AckFrame(6, True, False, (6,))]


def test_a_single_success_is_a_plain_ack() -> None:
    assert plan_acknowledgements([(7, True)], {7}) == [AckFrame(7, True, False, (7,))]


# --- settling a batch, without a broker -------------------------------------------------------------------


class RefusingPublisher(InMemoryPublisher):
    """Refuses the messages whose id is in ``refuse`` (as a broker that nacks them), publishes the rest."""

    def __init__(self, refuse: set[str]) -> None:
        super().__init__()
        self.refuse = refuse
        self.calls = 0

    async def publish(self, message: OutgoingMessage, *, exchange: str, routing_key: str) -> None:
        self.calls += 1
        if message.message_id in self.refuse:
            raise PublishFailed("nacked by the broker")
        await super().publish(message, exchange=exchange, routing_key=routing_key)


def scripted_spec(release: asyncio.Event | None = None) -> ConsumerSpec:
    """The body names what the handler does: ok, permanent, transient, or ok with an event named in it."""

    async def handle(body: bytes, _context: MessageContext) -> Sequence[MerchantEvent]:
        if release is not None:
            await release.wait()
        what = orjson.loads(body)["do"]
        if what == "permanent":
            raise PermanentError("refused for good")
        if what == "transient":
            raise TransientError("try later")
        return [event_for(what)]

    return ConsumerSpec(Consumer.TOKEN_CREATED, lambda body, _context: body, handle)


def scripted(channel: FakeChannel, what: str) -> FakeDelivery:
    return channel.deliver(notification_delivery(orjson.dumps({"do": what})))


@pytest.fixture
def topology(offline_settings: Any) -> Topology:
    settings: Settings = offline_settings(retry_delays="10s,1m")
    return build_topology(settings)


async def test_a_mixed_batch_gives_each_message_its_own_fate_and_coalesces_the_acks(topology: Topology) -> None:
    channel = FakeChannel()
    names = ["a", "b", "permanent", "c", "transient", "unpublishable", "d", "e"]
    deliveries = [scripted(channel, name) for name in names]
    publisher = RefusingPublisher({event_for("unpublishable").id})
    processor = DeliveryProcessor(topology, publisher)
    for delivery in deliveries:
        processor.settler.received(delivery)

    outcomes = await asyncio.gather(*(processor.process(scripted_spec(), d) for d in deliveries))

    assert outcomes == [Outcome.OK, Outcome.OK, Outcome.DEAD_LETTERED, Outcome.OK, Outcome.RETRIED, None,
                        Outcome.OK, Outcome.OK]
    assert [d.settled for d in deliveries] == ["ack"] * 5 + ["requeued"] + ["ack"] * 2
    # One publish each, all in the same batch; the refused one alone is requeued, between two multiple acks.
    assert publisher.calls == len(names)
    assert channel.frames == [("ack", 5, True), ("nack", 6, False), ("ack", 8, True)]
    assert [m.message_id for m in publisher.to(topology.dead_letter_queue(Consumer.TOKEN_CREATED))] == [
        deliveries[2].message_id]
    retry_queue = topology.retry_steps(Consumer.TOKEN_CREATED)[0].queue
    assert [m.headers[h.ATTEMPT] for m in publisher.to(retry_queue)] == [2]
    events = [p.message for p in publisher.published if p.exchange == topology.notifications_exchange]
    assert sorted(str(m.message_id) for m in events) == sorted(
        event_for(name).id for name in ("a", "b", "c", "d", "e"))


async def test_a_batch_waits_for_no_message_of_another_batch(topology: Topology) -> None:
    channel = FakeChannel()
    held = asyncio.Event()
    slow = scripted(channel, "slow")
    quick = [scripted(channel, name) for name in ("q1", "q2", "q3")]
    processor = DeliveryProcessor(topology, InMemoryPublisher())
    for delivery in (slow, *quick):
        processor.settler.received(delivery)

    slow_task = asyncio.create_task(processor.process(scripted_spec(held), slow))
    assert await asyncio.gather(*(processor.process(scripted_spec(), d) for d in quick)) == [Outcome.OK] * 3
    # Tag 1 is still being handled: the others are acked one by one, never "up to" a tag above it.
    assert slow.settled is None
    assert channel.frames == [("ack", 2, False), ("ack", 3, False), ("ack", 4, False)]
    held.set()
    assert await slow_task is Outcome.OK
    assert channel.frames[-1] == ("ack", 1, False)


async def test_a_failed_ack_leaves_the_message_to_redelivery(topology: Topology) -> None:
    channel = FakeChannel()
    deliveries = [scripted(channel, name) for name in ("a", "b")]
    processor = DeliveryProcessor(topology, InMemoryPublisher())
    for delivery in deliveries:
        processor.settler.received(delivery)

    async def channel_gone(multiple: bool = False) -> None:
        raise aiormq.exceptions.ChannelInvalidStateError("closed")

    deliveries[1].ack = channel_gone  # type: ignore[method-assign]
    outcomes = await asyncio.gather(*(processor.process(scripted_spec(), d) for d in deliveries))
    assert outcomes == [None, None]  # the multiple ack of both failed: neither counts as processed
    assert [d.settled for d in deliveries] == [None, None]


# --- a mixed batch on the real broker -----------------------------------------------------------------------


class RefuseOnce:
    """The worker's real publisher, except that the first publish of ``message_id`` is refused."""

    def __init__(self, publisher: Any, message_id: str) -> None:
        self._publisher = publisher
        self._message_id = message_id
        self.refused = 0

    @property
    def ready(self) -> bool:
        return bool(self._publisher.ready)

    async def publish(self, message: OutgoingMessage, *, exchange: str, routing_key: str) -> None:
        if message.message_id == self._message_id and not self.refused:
            self.refused += 1
            raise PublishFailed("nacked by the broker")
        await self._publisher.publish(message, exchange=exchange, routing_key=routing_key)


async def test_a_mixed_batch_on_the_broker(make_settings, amqp_connection, monkeypatch) -> None:
    settings = make_settings(retry_delays=FAST_RETRIES)
    topology = build_topology(settings)
    frames: list[tuple[str, int, bool]] = []
    basic_ack, basic_nack = aiormq.Channel.basic_ack, aiormq.Channel.basic_nack

    async def spy_ack(self: Any, delivery_tag: int, multiple: bool = False, **kwargs: Any) -> None:
        frames.append(("ack", delivery_tag, multiple))
        await basic_ack(self, delivery_tag, multiple, **kwargs)

    async def spy_nack(self: Any, delivery_tag: int | None = None, multiple: bool = False, requeue: bool = True,
                       **kwargs: Any) -> None:
        frames.append(("nack", delivery_tag or 0, multiple))
        await basic_nack(self, delivery_tag, multiple, requeue, **kwargs)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", spy_ack)
    monkeypatch.setattr(aiormq.Channel, "basic_nack", spy_nack)

    names = ["a", "b", "permanent", "c", "transient", "unpublishable", "d", "e"]
    release = asyncio.Event()
    handled: list[tuple[str, int]] = []

    async def handle(body: bytes, context: MessageContext) -> Sequence[MerchantEvent]:
        what = orjson.loads(body)["do"]
        handled.append((what, context.attempt))
        await release.wait()  # the first deliveries finish together: one batch
        if what == "permanent":
            raise PermanentError("refused for good")
        if what == "transient" and context.attempt == 1:
            raise TransientError("try later")
        return [event_for(what)]

    spec = ConsumerSpec(Consumer.TOKEN_CREATED, lambda body, _context: body, handle, prefetch=len(names))
    workers = Workers(settings, [spec], http_port=0)
    refusing = RefuseOnce(workers.publisher, event_for("unpublishable").id)
    workers.runtime.processor.settler.publisher = refusing  # type: ignore[assignment]
    ok_before = processed(Consumer.TOKEN_CREATED, "ok")
    await workers.start()
    try:
        await workers.wait_ready(WAIT_SECONDS)
        channel = await amqp_connection.channel(publisher_confirms=True)
        for name in names:
            await channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps({"do": name}), message_id=f"m-{name}",
                                 headers={h.PROVIDER: "aps", h.ATTEMPT: 1},
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=topology.consumer_queue(Consumer.TOKEN_CREATED))
        await wait_for(lambda: len(handled) == len(names), what="the whole batch held")
        release.set()

        # Every success and, once redelivered, the refused one and the retried one: an event each.
        events = await take(amqp_connection, topology.consumer_queue(Consumer.MERCHANT_EVENTS), count=7)
        assert sorted(str(e.message_id) for e in events) == sorted(
            event_for(name).id for name in ("a", "b", "c", "d", "e", "unpublishable", "transient"))
        [dead] = await take(amqp_connection, topology.dead_letter_queue(Consumer.TOKEN_CREATED))
        assert dead.message_id == "m-permanent"
        assert dead.headers[h.DEAD_REASON] == "refused for good"
        await wait_for(lambda: processed(Consumer.TOKEN_CREATED, "ok") == ok_before + 7, what="seven ok")
        assert handled.count(("unpublishable", 1)) == 2  # requeued: redelivered as it was
        assert ("transient", 2) in handled
        assert refusing.refused == 1
        # The first batch: tags 1-5 in one ack, the refused 6 requeued, 7-8 in one ack.
        assert frames[:3] == [("ack", 5, True), ("nack", 6, False), ("ack", 8, True)]
        assert len([f for f in frames if f[0] == "ack"]) < 7
        await wait_for(lambda: frames[-1][0] == "ack" and len(frames) == 5, what="the redelivery acked")
        assert await queue_depth(amqp_connection, topology.consumer_queue(Consumer.TOKEN_CREATED)) == 0
    finally:
        await workers.stop()
