"""The token-canceled worker (docs/queues.md): canceled stays canceled, the merchant hears it once."""

from __future__ import annotations

import uuid

import aio_pika

from authnotify.config import Settings
from authnotify.domain.authorizations import access_token_fingerprint
from authnotify.messaging import headers as h
from authnotify.messaging.topology import Consumer, build_topology
from authnotify.store import SqlStore as Store
from tests.events_harness import (
    ams_token_canceled,
    ams_token_created,
    aps_token_canceled,
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


def unique_token() -> str:
    return f"AT{uuid.uuid4().hex}"


async def test_cancel_after_create_carries_everything_known_into_the_event(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, store: Store
) -> None:
    topology = build_topology(settings)
    events_queue = topology.consumer_queue(Consumer.MERCHANT_EVENTS)
    access_token = unique_token()
    created = aps_token_created(access_token)
    async with running_workers(settings, "token-created", "token-canceled"):
        await publish_notification(channel, settings, "aps", created)
        [activated] = events_of(await take_messages(channel, events_queue, 1))
        await publish_notification(channel, settings, "aps", aps_token_canceled(access_token, tokenCancelSource="PSP"))
        [message] = await take_messages(channel, events_queue, 1)
    [canceled] = events_of([message])
    assert activated.type == "authorization.activated"
    assert canceled.type == "authorization.canceled"
    assert message.message_id == canceled.id != activated.id
    data = canceled.data
    assert data.status == "canceled"
    assert data.accessTokenFingerprint == access_token_fingerprint(access_token)
    assert data.referenceAgreementId == created["referenceAgreementId"]
    assert data.customerId == created["customerId"]
    assert data.scopes == created["scopes"]
    assert data.accessTokenExpiryTime == "2022-06-06T04:12:12Z"
    assert data.refreshTokenExpiryTime == "2022-06-08T04:12:12Z"
    assert data.tokenCancelSource == "PSP"
    assert data.reason == "user unbound the wallet"
    assert data.canceledAt is not None
    assert await store.get_authorization(data.accessTokenFingerprint) == data
    assert access_token not in message.body.decode()


async def test_ams_cancel_after_create(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, store: Store
) -> None:
    topology = build_topology(settings)
    events_queue = topology.consumer_queue(Consumer.MERCHANT_EVENTS)
    access_token = unique_token()
    async with running_workers(settings, "token-created", "token-canceled"):
        await publish_notification(channel, settings, "ams", ams_token_created(access_token))
        await take_messages(channel, events_queue, 1)
        await publish_notification(channel, settings, "ams", ams_token_canceled(access_token))
        [canceled] = events_of(await take_messages(channel, events_queue, 1))
    assert canceled.type == "authorization.canceled"
    assert canceled.data.provider == "ams" and canceled.data.status == "canceled"
    assert canceled.data.authClientId == "2188120000001234"
    assert canceled.data.customerId == "2088102000000001"
    assert canceled.data.reason == "user canceled in the wallet"
    assert canceled.data.tokenCancelSource is None  # AMS does not say who canceled


async def test_cancel_before_create_stays_canceled_and_never_activates(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, store: Store
) -> None:
    topology = build_topology(settings)
    events_queue = topology.consumer_queue(Consumer.MERCHANT_EVENTS)
    access_token = unique_token()
    created = aps_token_created(access_token)
    async with running_workers(settings, "token-canceled"):
        await publish_notification(channel, settings, "aps", aps_token_canceled(access_token, tokenCancelSource="ACQUIRER"))
        [canceled] = events_of(await take_messages(channel, events_queue, 1))
    assert canceled.type == "authorization.canceled"
    assert canceled.data.referenceAgreementId is None  # not known yet

    before = metric(PROCESSED, queue="token-created", outcome="ok")
    async with running_workers(settings, "token-created"):
        await publish_notification(channel, settings, "aps", created)
        await publish_notification(channel, settings, "aps", created, headers={h.REPLAYED: 1})

        async def both_done() -> bool:
            return metric(PROCESSED, queue="token-created", outcome="ok") - before >= 2

        await eventually(both_done, what="the late TOKEN_CREATED notifications processed")
    assert await take_all(channel, events_queue) == []  # no activation for a canceled authorization
    stored = await store.get_authorization(access_token_fingerprint(access_token))
    assert stored is not None
    assert stored.status == "canceled"
    assert stored.tokenCancelSource == "ACQUIRER"
    assert stored.referenceAgreementId == created["referenceAgreementId"]  # the late facts are kept


async def test_repeated_cancellation_emits_once_and_a_replay_re_emits_the_same_event(
    settings: Settings, channel: aio_pika.abc.AbstractChannel
) -> None:
    topology = build_topology(settings)
    events_queue = topology.consumer_queue(Consumer.MERCHANT_EVENTS)
    access_token = unique_token()
    body = aps_token_canceled(access_token)
    before = metric(PROCESSED, queue="token-canceled", outcome="ok")
    async with running_workers(settings, "token-canceled"):
        for _ in range(3):
            await publish_notification(channel, settings, "aps", body)

        async def done(count: int) -> bool:
            return metric(PROCESSED, queue="token-canceled", outcome="ok") - before >= count

        await eventually(lambda: done(3), what="three cancellations processed")
        first = events_of(await take_all(channel, events_queue))
        await publish_notification(channel, settings, "aps", body, headers={h.REPLAYED: 1})
        await eventually(lambda: done(4), what="the replay processed")
        again = events_of(await take_all(channel, events_queue))
    assert [e.type for e in first] == ["authorization.canceled"]
    assert again == first


async def test_alipay_plus_cancel_without_token_cancel_source_is_dead_lettered(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, store: Store
) -> None:
    topology = build_topology(settings)
    access_token = unique_token()
    async with running_workers(settings, "token-canceled"):
        message_id = await publish_notification(
            channel, settings, "aps", aps_token_canceled(access_token, tokenCancelSource=None)
        )
        bad_source = await publish_notification(
            channel, settings, "aps", aps_token_canceled(unique_token(), tokenCancelSource="MERCHANT")
        )
        dead = await take_messages(channel, topology.dead_letter_queue(Consumer.TOKEN_CANCELED), 2)
    reasons = {m.message_id: m.headers[h.DEAD_REASON] for m in dead}
    assert reasons[message_id] == "tokenCancelSource: required field is missing"
    assert reasons[bad_source].startswith("tokenCancelSource: Input should be 'ACQUIRER' or 'PSP'")
    assert all(m.headers[h.DEAD_ATTEMPTS] == 1 for m in dead)
    assert await take_all(channel, topology.consumer_queue(Consumer.MERCHANT_EVENTS)) == []
    assert await store.list_authorizations() == []
