"""The token-created worker (docs/queues.md): tokens stored once, one ``authorization.activated``."""

from __future__ import annotations

import uuid
from typing import Any

import aio_pika

from authnotify.config import Settings
from authnotify.domain.authorizations import access_token_fingerprint
from authnotify.messaging import headers as h
from authnotify.messaging.topology import Consumer, build_topology
from authnotify.store import SqlStore as Store
from tests.events_harness import (
    ams_token_created,
    aps_token_created,
    events_of,
    eventually,
    metric,
    publish_notification,
    running_workers,
    take_all,
    take_messages,
)

PROCESSED = "authnotify_messages_processed_total"


def unique_token(prefix: str = "AT") -> str:
    return f"{prefix}{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"


async def wait_processed(count: int, before: float, outcome: str = "ok") -> None:
    async def done() -> bool:
        return metric(PROCESSED, queue="token-created", outcome=outcome) - before >= count

    await eventually(done, what=f"{count} token-created messages {outcome}")


async def test_alipay_plus_token_created_stores_tokens_and_emits_one_activated(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, store: Store
) -> None:
    topology = build_topology(settings)
    access_token = unique_token()
    body = aps_token_created(access_token)
    async with running_workers(settings, "token-created"):
        await publish_notification(channel, settings, "aps", body)
        [message] = await take_messages(channel, topology.consumer_queue(Consumer.MERCHANT_EVENTS), 1)
    [event] = events_of([message])
    fingerprint = access_token_fingerprint(access_token)
    assert event.type == "authorization.activated"
    assert message.message_id == event.id
    data = event.data.model_dump()
    assert data == {
        "provider": "aps",
        "status": "active",
        "accessTokenFingerprint": fingerprint,
        "authClientId": "218823863726123456789",
        "referenceMerchantId": "218823863726123456780",
        "referenceAgreementId": body["referenceAgreementId"],
        "customerId": "278980891234567891234567891",
        "userLoginId": "62-34312736",
        "authState": None,
        "scopes": ["AGREEMENT_PAY", "USER_LOGIN_ID"],
        "accessTokenExpiryTime": "2022-06-06T04:12:12Z",
        "refreshTokenExpiryTime": "2022-06-08T04:12:12Z",
        "canceledAt": None,
        "tokenCancelSource": None,
        "reason": None,
    }
    assert await store.get_authorization(fingerprint) == event.data
    assert await store.get_authorization(body["referenceAgreementId"]) == event.data
    assert await store.tokens_of("aps", fingerprint) == (access_token, f"refresh-{access_token}")
    assert access_token not in message.body.decode()


async def test_ams_token_created_stores_what_antom_sends(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, store: Store
) -> None:
    topology = build_topology(settings)
    access_token = unique_token()
    async with running_workers(settings, "token-created"):
        await publish_notification(channel, settings, "ams", ams_token_created(access_token))
        [event] = events_of(await take_messages(channel, topology.consumer_queue(Consumer.MERCHANT_EVENTS), 1))
    assert event.type == "authorization.activated"
    assert event.data.provider == "ams" and event.data.status == "active"
    assert event.data.authClientId == "2188120000001234"
    assert event.data.customerId == "2088102000000001"  # AMS userId: the wallet's id of the user
    assert event.data.userLoginId == "alice***@example.com"
    assert event.data.authState == "663A8FA9-D836-48EE-8AA1-1FF682989DC7"
    assert event.data.referenceMerchantId is None and event.data.accessTokenExpiryTime is None
    assert await store.tokens_of("ams", access_token_fingerprint(access_token)) == (access_token, None)


async def test_same_notification_three_times_is_one_row_and_one_event_id(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, store: Store
) -> None:
    topology = build_topology(settings)
    events_queue = topology.consumer_queue(Consumer.MERCHANT_EVENTS)
    access_token = unique_token()
    body = aps_token_created(access_token)
    before = metric(PROCESSED, queue="token-created", outcome="ok")
    async with running_workers(settings, "token-created"):
        # Alipay's redeliveries are new requests: each is a new message with its own id.
        for _ in range(3):
            await publish_notification(channel, settings, "aps", body)
        await wait_processed(3, before)
        first = events_of(await take_all(channel, events_queue))
        # An operator replay may have lost its event on the way: it is emitted again, same webhook-id.
        await publish_notification(channel, settings, "aps", body, headers={h.REPLAYED: 1})
        await wait_processed(4, before)
        replayed = events_of(await take_all(channel, events_queue))
    assert [e.type for e in first] == ["authorization.activated"]
    assert [e.id for e in replayed] == [first[0].id]
    assert replayed[0] == first[0]  # byte-identical event, createdAt included
    rows = await store.list_authorizations()
    assert [row.accessTokenFingerprint for row in rows] == [access_token_fingerprint(access_token)]




INVALID = [
    ("aps", aps_token_created("AT-long-merchant", referenceMerchantId="M" * 33),
     "referenceMerchantId: String should have at most 32 characters"),
    ("aps", aps_token_created("AT-no-wallet", walletForAccountBinding=None),
     "walletForAccountBinding: required field is missing"),
    ("aps", aps_token_created("AT-no-agreement", referenceAgreementId=None),
     "referenceAgreementId: required field is missing"),
    ("aps", aps_token_created("AT-numeric-customer", customerId=278980891234),
     "customerId: Input should be a valid string"),
    ("aps", aps_token_created("AT-naive-expiry", accessTokenExpiryTime="2022-06-06T12:12:12"),
     "accessTokenExpiryTime: Value error, must carry a UTC offset"),
    ("aps", aps_token_created("T" * 129), "accessToken: String should have at most 128 characters"),
    ("ams", ams_token_created("AT-ams-no-result", result=None), "result: required field is missing"),
    ("ams", ams_token_created("AT-ams-failed", result={"resultCode": "X", "resultStatus": "F"}),
     "result: Value error, result.resultStatus is F, not S"),
    ("ams", ams_token_created(None), "accessToken: required field is missing"),
]


async def test_invalid_bodies_are_dead_lettered_at_once_with_the_rule_they_break(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, store: Store
) -> None:
    topology = build_topology(settings)
    expected: dict[str, tuple[dict[str, Any], str]] = {}
    async with running_workers(settings, "token-created"):
        for provider, body, reason in INVALID:
            message_id = await publish_notification(channel, settings, provider, body)
            expected[message_id] = (body, reason)
        dead = await take_messages(channel, topology.dead_letter_queue(Consumer.TOKEN_CREATED), len(INVALID))
    assert {m.message_id for m in dead} == set(expected)
    for message in dead:
        body, reason = expected[message.message_id]
        assert message.headers[h.DEAD_REASON].startswith(reason), message.headers[h.DEAD_REASON]
        assert message.headers[h.DEAD_ATTEMPTS] == 1
        if body.get("accessToken"):
            assert body["accessToken"] not in message.headers[h.DEAD_REASON]
    assert await take_all(channel, topology.consumer_queue(Consumer.MERCHANT_EVENTS)) == []
    assert await store.list_authorizations() == []
