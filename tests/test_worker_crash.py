"""A worker killed mid-batch loses nothing and applies nothing twice (docs/queues.md, docs/deployment.md).

``authnotify worker token-created`` runs as a real subprocess; it is SIGKILLed while it holds messages
(no drain, no acks for what it held), then started again. Every authorization is stored exactly once and
each has exactly one ``authorization.activated`` webhook-id; a message the broker redelivers after the
crash may re-emit its event, but with the same id, so the merchant sees one event.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import aio_pika

from authnotify.config import Settings
from authnotify.domain.authorizations import access_token_fingerprint
from authnotify.messaging.topology import Consumer, build_topology
from authnotify.store import SqlStore as Store
from tests.events_harness import (
    aps_token_created,
    declare,
    events_of,
    eventually,
    new_token_key,
    publish_notification,
    queue_depth,
    take_all,
)

BATCH = 200


def worker_env(settings: Settings, token_key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env.update({
        "AUTHNOTIFY_RABBITMQ_URL": settings.broker_url(),
        "AUTHNOTIFY_DATABASE_URL": settings.store_url(),
        "AUTHNOTIFY_NAMESPACE": settings.namespace,
        "AUTHNOTIFY_QUEUE_TYPE": settings.queue_type,
        "AUTHNOTIFY_TOKEN_KEYS": token_key,
        "AUTHNOTIFY_WORKER_HTTP_PORT": "0",
        "AUTHNOTIFY_RETRY_DELAYS": "200ms,400ms",
    })
    return env


def start_worker(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "authnotify", "worker", "token-created"],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log.open("ab"),
    )


async def test_worker_killed_mid_batch_stores_each_authorization_once_with_one_event_id(
    make_settings: Callable[..., Settings], amqp_connection: aio_pika.abc.AbstractConnection,
    database_url: str, tmp_path: Path,
) -> None:
    token_key = new_token_key()
    settings = make_settings(database_url=database_url, token_keys=token_key, retry_delays="200ms,400ms")
    topology = build_topology(settings)
    consumer_queue = topology.consumer_queue(Consumer.TOKEN_CREATED)
    events_queue = topology.consumer_queue(Consumer.MERCHANT_EVENTS)
    channel = await amqp_connection.channel(publisher_confirms=True)
    await declare(channel, settings)
    schema = await Store.connect(settings.store_url(), settings.token_keys)  # schema in place before workers race
    await schema.close()

    tokens = [f"AT{uuid.uuid4().hex}{i:04d}" for i in range(BATCH)]
    await asyncio.gather(*(publish_notification(channel, settings, "aps", aps_token_created(t)) for t in tokens))
    # Alipay's redeliveries of a few of them, too.
    for token in tokens[:20]:
        await publish_notification(channel, settings, "aps", aps_token_created(token))

    env = worker_env(settings, token_key)
    log = tmp_path / "worker.log"
    worker = start_worker(env, tmp_path, log)
    try:
        async def some_processed() -> bool:
            return await queue_depth(channel, events_queue) >= 10

        await eventually(some_processed, timeout=30, interval=0.01, what="the worker to get going")
        worker.send_signal(signal.SIGKILL)  # no drain: what it held goes back to the queue unacked
        worker.wait(10)
        left = await queue_depth(channel, consumer_queue)
        assert left > 0, "the batch finished before the kill; the test proves nothing"

        worker = start_worker(env, tmp_path, log)

        async def all_processed() -> bool:
            return await queue_depth(channel, consumer_queue) == 0 and \
                await queue_depth(channel, events_queue) >= BATCH

        await eventually(all_processed, timeout=60, interval=0.1, what="the restarted worker to finish")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)

    events = events_of(await take_all(channel, events_queue))
    ids_by_authorization: dict[str, set[str]] = defaultdict(set)
    for event in events:
        assert event.type == "authorization.activated"
        ids_by_authorization[event.data.accessTokenFingerprint].add(event.id)
    fingerprints = {access_token_fingerprint(t) for t in tokens}
    assert set(ids_by_authorization) == fingerprints
    assert all(len(ids) == 1 for ids in ids_by_authorization.values())
    # Duplicate event messages only come from messages held at the kill (at most the prefetch).
    assert len(events) - BATCH <= 64

    store = await Store.connect(settings.store_url(), settings.token_keys)
    try:
        rows = await store.list_authorizations()
    finally:
        await store.close()
    assert len(rows) == BATCH
    assert {row.accessTokenFingerprint for row in rows} == fingerprints
    assert all(row.status == "active" for row in rows)
    assert not (await take_all(channel, topology.dead_letter_queue(Consumer.TOKEN_CREATED)))
    assert "Traceback" not in log.read_text()
