"""What the consumer runtime makes of each handler outcome, without a broker (an in-memory publisher and
deliveries that record their acknowledgement). The same outcomes on the real broker: tests/test_runtime.py."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
import pytest

from authnotify.config import Settings
from authnotify.domain.authorizations import AuthorizationData
from authnotify.domain.events import MerchantEvent
from authnotify.errors import PermanentError, TransientError
from authnotify.messaging import headers as h
from authnotify.messaging.consumer import ConsumerSpec, DeliveryProcessor, MessageContext, Outcome
from authnotify.messaging.memory import InMemoryPublisher
from authnotify.messaging.topology import Consumer, Topology, build_topology, event_routing_key
from tests.fakes import notification_delivery

ACCESS_TOKEN = "281UT3C0aYAhE2bK2iVqfyXpZ5f0Rza5mA0P5ytj4iu1XUZT9e2"
BODY = orjson.dumps({"authorizationNotifyType": "TOKEN_CREATED", "accessToken": ACCESS_TOKEN})


def sample_event() -> MerchantEvent:
    data = AuthorizationData(provider="aps", status="active", accessTokenFingerprint="3f1c0123456789ab")
    return MerchantEvent.of("authorization.activated", data, datetime(2026, 1, 2, 3, 4, 5))


@pytest.fixture
def topology(offline_settings: Any) -> Topology:
    settings: Settings = offline_settings(retry_delays="10s,1m")
    return build_topology(settings)


def spec_raising(error: BaseException | None, events: Sequence[MerchantEvent] = ()) -> tuple[ConsumerSpec, list[MessageContext]]:
    seen: list[MessageContext] = []

    async def handle(_parsed: Any, context: MessageContext) -> Sequence[MerchantEvent]:
        seen.append(context)
        if error is not None:
            raise error
        return events

    return ConsumerSpec(Consumer.TOKEN_CREATED, lambda body, _context: body, handle), seen


async def test_success_publishes_the_events_then_acks(topology: Topology) -> None:
    publisher = InMemoryPublisher()
    event = sample_event()
    spec, _ = spec_raising(None, [event])
    delivery = notification_delivery(BODY)

    assert await DeliveryProcessor(topology, publisher).process(spec, delivery) is Outcome.OK

    [published] = publisher.published
    assert (published.exchange, published.routing_key) == (topology.notifications_exchange,
                                                           event_routing_key("authorization.activated"))
    assert published.message.body == event.to_json() and published.message.message_id == event.id
    assert published.message.properties.delivery_mode == 2
    assert delivery.settled == "ack"


async def test_a_permanent_error_goes_to_the_dead_letter_queue_unchanged(topology: Topology) -> None:
    publisher = InMemoryPublisher()
    spec, _ = spec_raising(PermanentError(f"refused {ACCESS_TOKEN}"))
    delivery = notification_delivery(BODY, attempt=1)

    assert await DeliveryProcessor(topology, publisher).process(spec, delivery) is Outcome.DEAD_LETTERED

    [dead] = publisher.to(topology.dead_letter_queue(Consumer.TOKEN_CREATED))
    assert dead.body == BODY and dead.message_id == delivery.message_id
    headers = dead.headers
    assert headers[h.DEAD_REASON] == "refused [redacted]"  # a secret the body holds never leaves in a reason
    assert headers[h.DEAD_ATTEMPTS] == 1 and headers[h.DEAD_QUEUE] == "token-created" and headers[h.DEAD_AT]
    assert delivery.settled == "ack"


@pytest.mark.parametrize("error", [TransientError("gateway answered U"), RuntimeError("unexpected")])
async def test_other_errors_are_retried_through_the_delay_of_their_attempt(topology: Topology,
                                                                          error: Exception) -> None:
    publisher = InMemoryPublisher()
    spec, _ = spec_raising(error)
    steps = topology.retry_steps(Consumer.TOKEN_CREATED)

    first = notification_delivery(BODY, attempt=1)
    assert await DeliveryProcessor(topology, publisher).process(spec, first) is Outcome.RETRIED
    second = notification_delivery(BODY, attempt=2)
    assert await DeliveryProcessor(topology, publisher).process(spec, second) is Outcome.RETRIED

    assert [p.routing_key for p in publisher.published] == [steps[0].queue, steps[1].queue]
    assert [p.message.headers[h.ATTEMPT] for p in publisher.published] == [2, 3]
    assert all(p.exchange == "" and p.message.body == BODY for p in publisher.published)
    assert first.settled == second.settled == "ack"


async def test_after_the_last_attempt_a_failure_is_dead_lettered_with_its_reason(topology: Topology) -> None:
    publisher = InMemoryPublisher()
    spec, _ = spec_raising(TransientError("merchant answered HTTP 503"))
    last = notification_delivery(BODY, attempt=topology.max_attempts(Consumer.TOKEN_CREATED))

    assert await DeliveryProcessor(topology, publisher).process(spec, last) is Outcome.DEAD_LETTERED

    [dead] = publisher.to(topology.dead_letter_queue(Consumer.TOKEN_CREATED))
    assert dead.headers[h.DEAD_REASON] == "merchant answered HTTP 503"
    assert dead.headers[h.DEAD_ATTEMPTS] == topology.max_attempts(Consumer.TOKEN_CREATED)


@pytest.mark.parametrize("error", [None, PermanentError("bad"), TransientError("later")])
async def test_nothing_is_acked_when_its_follow_up_is_not_confirmed(topology: Topology,
                                                                   error: Exception | None) -> None:
    publisher = InMemoryPublisher(failure="nacked by the broker")
    spec, _ = spec_raising(error, [sample_event()])
    delivery = notification_delivery(BODY)

    assert await DeliveryProcessor(topology, publisher).process(spec, delivery) is None
    assert delivery.settled == "requeued"


@pytest.mark.parametrize(("attempt", "redelivered", "replayed", "seen"), [
    (1, False, False, False), (1, True, False, True), (2, False, False, True), (1, False, True, True),
])
async def test_the_handler_learns_whether_the_message_may_have_been_handled_before(
    topology: Topology, attempt: int, redelivered: bool, replayed: bool, seen: bool,
) -> None:
    spec, contexts = spec_raising(None)
    extra = {h.REPLAYED: 1} if replayed else {}
    delivery = notification_delivery(BODY, provider="ams", attempt=attempt, redelivered=redelivered, **extra)

    await DeliveryProcessor(topology, InMemoryPublisher()).process(spec, delivery)

    [context] = contexts
    assert (context.provider, context.attempt, context.possibly_seen_before) == ("ams", attempt, seen)
    assert context.message_id == delivery.message_id


async def test_a_parse_error_names_the_broken_rule_and_not_the_value(topology: Topology) -> None:
    from authnotify.workers.token_created import parse_token_created

    async def never(_parsed: Any, _context: MessageContext) -> None:
        raise AssertionError("the handler must not run on an invalid body")

    spec = ConsumerSpec(Consumer.TOKEN_CREATED, parse_token_created, never)
    body = orjson.dumps({"authorizationNotifyType": "TOKEN_CREATED", "accessToken": "x" * 200,
                         "result": {"resultCode": "SUCCESS", "resultStatus": "S"}})
    publisher = InMemoryPublisher()

    assert await DeliveryProcessor(topology, publisher).process(
        spec, notification_delivery(body, provider="ams")) is Outcome.DEAD_LETTERED

    reason = publisher.published[0].message.headers[h.DEAD_REASON]
    assert reason == "accessToken: String should have at most 128 characters" and "x" * 20 not in reason
