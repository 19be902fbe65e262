"""Any body, of any shape, size or nesting depth, ends in an outcome (issue 5): acked after a success, a retry
or a dead letter with a reason; never an exception out of the runtime, never a message left unsettled.

Generated bodies go through :class:`DeliveryProcessor` with every consumer's real parse function and handler
(the store and publisher in memory, so the run stays fast). A body nested 990 levels deep once raised
RecursionError inside the code that describes a failure, and the message held its prefetch slot until restart.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from authnotify.domain.merchants import MerchantRegistry
from authnotify.messaging import headers as h
from authnotify.messaging.consumer import ConsumerSpec, DeliveryProcessor, MessageContext, Outcome, failure_reason
from authnotify.messaging.memory import InMemoryPublisher
from authnotify.messaging.topology import Consumer, Topology, build_topology
from authnotify.store.memory import InMemoryStore
from authnotify.workers import authcode_created, merchant_events, token_canceled, token_created
from tests.fakes import FakeDelivery

KEYS = st.sampled_from(["authorizationNotifyType", "accessToken", "authCode", "refreshToken", "result",
                        "resultStatus", "authClientId", "referenceMerchantId", "pspId", "acquirerId", "scopes",
                        "tokenCancelSource", "id", "type", "data", "provider", "status"]) | st.text(max_size=12)
TYPES = st.sampled_from(["AUTHCODE_CREATED", "TOKEN_CREATED", "TOKEN_CANCELED", "authorization.activated", "x"])
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | TYPES
           | st.text(max_size=40) | st.text(min_size=100, max_size=300))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6),
                    max_leaves=30)


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"authorizationNotifyType":"TOKEN_CREATED","accessToken":"t",' + b'"a":{' * depth + b"}" * depth + b"}"


BODIES = (
    JSON.map(orjson.dumps)
    | st.binary(max_size=300)
    | st.integers(20, 5000).map(lambda n: b'{"authorizationNotifyType":"TOKEN_CREATED","accessToken":1' + b"0" * n + b"}")
    | st.builds(nested, st.integers(1, 3000), st.sampled_from(["list", "object"]))
    | st.dictionaries(KEYS, JSON, max_size=8).map(lambda d: orjson.dumps({"authorizationNotifyType": "TOKEN_CREATED", **d}))
)


def specs() -> list[ConsumerSpec]:
    store = InMemoryStore()
    registry = MerchantRegistry(entries={}, default=None)

    async def authcode(model: Any, context: MessageContext) -> Any:
        return await authcode_created.handle_authcode_created(model, context, store=store, alipay_clients={})

    async def created(model: Any, context: MessageContext) -> Any:
        return await token_created.handle_token_created(model, context, store=store)

    async def canceled(model: Any, context: MessageContext) -> Any:
        return await token_canceled.handle_token_canceled(model, context, store=store)

    async def merchant(event: Any, context: MessageContext) -> Any:
        return await merchant_events.handle_merchant_event(event, context, registry=registry, http=None)  # type: ignore[arg-type]

    return [
        ConsumerSpec(Consumer.AUTHCODE_CREATED, authcode_created.parse_authcode_created, authcode),
        ConsumerSpec(Consumer.TOKEN_CREATED, token_created.parse_token_created, created),
        ConsumerSpec(Consumer.TOKEN_CANCELED, token_canceled.parse_token_canceled, canceled),
        ConsumerSpec(Consumer.MERCHANT_EVENTS, merchant_events.parse_merchant_event, merchant),
    ]


@pytest.fixture(scope="module")
def topology() -> Topology:
    class Fast:
        namespace, queue_type = "fuzz", "classic"

        def retry_delays_for(self, _consumer: str) -> tuple[float, ...]:
            return (1.0, 2.0)

    return build_topology(Fast())


def settle(topology: Topology, body: bytes, provider: str, attempt: int) -> list[tuple[FakeDelivery, Outcome | None]]:
    async def run() -> list[tuple[FakeDelivery, Outcome | None]]:
        publisher = InMemoryPublisher()
        processor = DeliveryProcessor(topology, publisher)
        results = []
        for spec in specs():
            delivery = FakeDelivery(body, headers={h.PROVIDER: provider, h.ATTEMPT: attempt},
                                    routing_key=f"{provider}.x")
            outcome = await processor.process(spec, delivery)
            results.append((delivery, outcome))
            if outcome in (Outcome.RETRIED, Outcome.DEAD_LETTERED):
                [follow_up] = publisher.published[-1:]
                reason = follow_up.message.headers.get(h.LAST_ERROR if outcome is Outcome.RETRIED else h.DEAD_REASON)
                assert isinstance(reason, str) and reason.strip(), (spec.consumer, outcome)
        return results

    return asyncio.run(run())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=BODIES, provider=st.sampled_from(["ams", "aps", "xx"]), attempt=st.integers(1, 3))
@example(body=nested(990, "list"), provider="aps", attempt=1)
@example(body=nested(990, "object"), provider="aps", attempt=3)
@example(body=nested(5000, "list"), provider="ams", attempt=1)
def test_every_body_ends_acked_retried_or_dead_lettered_with_a_reason(topology: Topology, body: bytes, provider: str,
                                                                     attempt: int) -> None:
    for delivery, outcome in settle(topology, body, provider, attempt):
        assert outcome in (Outcome.OK, Outcome.RETRIED, Outcome.DEAD_LETTERED)
        assert delivery.settled == "ack"


@given(body=BODIES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(body=nested(990, "object"))
def test_a_failure_reason_is_one_short_line_whatever_the_body(body: bytes) -> None:
    reason = failure_reason(ValueError("bad\nvalue with accessToken t"), body)
    assert reason and "\n" not in reason and len(reason) <= 300


def test_a_body_nested_990_deep_is_dead_lettered_with_its_reason_not_wedged(topology: Topology) -> None:
    """The reproduction of issue 5: the reason code raised RecursionError and the message stayed unsettled."""
    deep = b'{"authorizationNotifyType":"TOKEN_CREATED","accessToken":"SECRET-990","a":' + b"[" * 990 + b"]" * 990 + b"}"
    results = settle(topology, deep, "aps", 1)
    assert [delivery.settled for delivery, _ in results] == ["ack"] * 4
    assert all(outcome is not None for _, outcome in results)
