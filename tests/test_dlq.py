"""``authnotify dlq list|replay|purge`` through the real CLI against the real broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from authnotify.config import Settings
from authnotify.errors import PermanentError
from authnotify.messaging import headers as h
from authnotify.messaging.consumer import ConsumerSpec, MessageContext
from authnotify.messaging.deadletters import DeadLetter, DeadLetterQueues, Selection
from authnotify.messaging.topology import KEEP_DELIVERY_LIMIT, Consumer, Topology, build_topology, declare_topology
from authnotify.workers.process import Workers

WAIT_SECONDS = 20.0
AUTH_CODE = "2810111301lGZcM9CjlF91WH00039190xxxx"


async def replay(settings: Settings, names: list[str], *, ids: list[str] | None = None, limit: int | None = None,
                 dry_run: bool = False) -> list[DeadLetter]:
    """What `dlq replay` does, in-process (the CLI adds only argument parsing and output)."""
    async with DeadLetterQueues.open(settings.broker_url(), build_topology(settings)) as queues:
        return await queues.replay(names, Selection(ids or [], limit), dry_run=dry_run)


async def list_dead_letters(settings: Settings, names: list[str]) -> list[DeadLetter]:
    async with DeadLetterQueues.open(settings.broker_url(), build_topology(settings)) as queues:
        return await queues.list(names)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture
async def setup(make_settings, amqp_connection, request: pytest.FixtureRequest) -> tuple[Settings, Topology]:
    # A test may ask for quorum queues with @pytest.mark.parametrize("queue_type", [...]).
    queue_type = request.getfixturevalue("queue_type") if "queue_type" in request.fixturenames else None
    settings = make_settings(retry_delays="200ms,400ms", **({"queue_type": queue_type} if queue_type else {}))
    topology = build_topology(settings)
    channel = await amqp_connection.channel()
    await declare_topology(channel, topology)
    await channel.close()
    return settings, topology


def cli_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env.update({
        "AUTHNOTIFY_RABBITMQ_URL": settings.broker_url(),
        "AUTHNOTIFY_NAMESPACE": settings.namespace,
        "AUTHNOTIFY_QUEUE_TYPE": settings.queue_type,
        "AUTHNOTIFY_RETRY_DELAYS": "200ms,400ms",
        "COLUMNS": "200",
    })
    return env


async def start_cli(settings: Settings, cwd: Path, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "dlq", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env or cli_env(settings), cwd=cwd,
    )


async def dlq(settings: Settings, cwd: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    process = await start_cli(settings, cwd, *args, env=env)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


def body_for(index: int) -> bytes:
    return orjson.dumps({
        "authorizationNotifyType": "AUTHCODE_CREATED", "authCode": f"{AUTH_CODE}{index}",
        "result": {"resultCode": "SUCCESS", "resultStatus": "S"},
    })


async def put_dead(connection: aio_pika.abc.AbstractConnection, topology: Topology, consumer: Consumer,
                   count: int, *, reason: str = "applyToken answered F: INVALID_CODE",
                   dead_at: str = "2026-11-23T10:00:05.000Z", body: Callable[[int], bytes] | None = None) -> list[str]:
    """Dead letters as the runtime writes them, in order, into an empty DLQ; returns their ids."""
    channel = await connection.channel(publisher_confirms=False)  # fast bulk; arrival awaited below
    ids = []
    already = await depth(connection, topology.dead_letter_queue(consumer))
    for index in range(count):
        message_id = uuid.uuid4().hex
        ids.append(message_id)
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=(body or body_for)(index), message_id=message_id, content_type=h.JSON_CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={h.PROVIDER: "ams", h.NOTIFY_TYPE: "AUTHCODE_CREATED", h.ATTEMPT: 3,
                         h.RECEIVED_AT: "2026-11-23T10:00:00.000Z", h.LAST_ERROR: "earlier",
                         h.DEAD_REASON: reason, h.DEAD_ATTEMPTS: 3, h.DEAD_QUEUE: consumer.value,
                         h.DEAD_AT: dead_at},
            ),
            routing_key=topology.dead_letter_queue(consumer),
        )
    await channel.close()
    await wait_for(lambda: _depth_at_least(connection, topology.dead_letter_queue(consumer), already + count),
                   what="dead letters stored")
    return ids


async def drain(connection: aio_pika.abc.AbstractConnection, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Takes (acks) everything the queue holds now."""
    channel = await connection.channel()
    queue = await channel.get_queue(queue_name, ensure=False)
    taken = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(message)
    await channel.close()
    return taken


async def depth(connection: aio_pika.abc.AbstractConnection, queue_name: str) -> int:
    channel = await connection.channel()
    queue = await channel.declare_queue(queue_name, passive=True)
    await channel.close()
    return queue.declaration_result.message_count or 0


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = WAIT_SECONDS, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# --- list -------------------------------------------------------------------------------------------


async def _list_by_closing_the_channel(connection: aio_pika.abc.AbstractConnection, queue_name: str) -> int:
    """What `dlq list` does to a queue: fetch every message unacked, then close the channel."""
    channel = await connection.channel()
    queue = await channel.declare_queue(queue_name, passive=True)
    fetched = 0
    for _ in range(queue.declaration_result.message_count or 0):
        if await queue.get(no_ack=False, fail=False) is None:
            break
        fetched += 1
    await channel.close()
    return fetched


async def test_listing_a_quorum_dead_letter_queue_50_times_loses_nothing(
        make_settings, amqp_connection: aio_pika.abc.AbstractConnection) -> None:
    """Issue 8: on RabbitMQ 4.x a quorum queue without its own delivery limit drops a message after 20 returns,
    and every listing returns each message once. Only the queues needed here are declared (RabbitMQ 3.10.8
    handles many quorum queue deletions badly); they are deleted when the session ends."""
    settings = make_settings(queue_type="quorum")
    topology = build_topology(settings)
    dlq = topology.dead_letter_queue(Consumer.TOKEN_CREATED)
    spec = topology.queue(dlq)
    assert spec.arguments["x-delivery-limit"] == KEEP_DELIVERY_LIMIT  # what makes it safe on 4.x
    control = f"{settings.namespace}.control-delivery-limit-20"  # RabbitMQ 4.x's default, set explicitly here
    channel = await amqp_connection.channel()
    await channel.declare_queue(dlq, durable=True, arguments=spec.arguments)
    await channel.declare_queue(control, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 20})
    await channel.close()
    try:
        ids = await put_dead(amqp_connection, topology, Consumer.TOKEN_CREATED, 5)
        for name in (control,):
            publisher = await amqp_connection.channel()
            for index in range(5):
                await publisher.default_exchange.publish(aio_pika.Message(body_for(index), delivery_mode=2), name)
            await publisher.close()
            await wait_for(lambda name=name: _depth_at_least(amqp_connection, name, 5), what="control filled")

        queues = DeadLetterQueues(amqp_connection, topology)  # not .open(): that declares every queue
        for listing in range(50):
            # A listing's messages go back when its channel closes, a moment later: wait for all five (a lost
            # one never comes back, and the wait fails).
            await wait_for(lambda: _depth_at_least(amqp_connection, dlq, 5), what=f"dead letters back ({listing})")
            assert [letter.id for letter in await queues.list(["token-created"])] == ids, listing
            await _list_by_closing_the_channel(amqp_connection, control)
        assert await depth(amqp_connection, dlq) == 5
        assert await depth(amqp_connection, control) == 0  # the same listings empty a queue with a limit of 20
    finally:
        cleanup = await amqp_connection.channel()
        await cleanup.queue_delete(control, if_unused=False, if_empty=False)
        await cleanup.close()


async def test_a_dead_letter_queue_declared_by_an_earlier_version_is_kept_with_a_warning(
        make_settings, amqp_connection: aio_pika.abc.AbstractConnection, capsys) -> None:
    """Queue arguments cannot change: a deployment whose dead-letter queue predates the delivery limit keeps
    starting, and says what to do (a policy) instead of failing on PRECONDITION_FAILED."""
    from authnotify.observability.logging import configure_logging

    configure_logging("json")
    settings = make_settings(queue_type="quorum")
    topology = build_topology(settings)
    dlq = topology.dead_letter_queue(Consumer.TOKEN_CANCELED)
    channel = await amqp_connection.channel()
    await channel.declare_queue(dlq, durable=True, arguments={"x-queue-type": "quorum"})  # as 0.1.0 declared it
    spec = topology.queue(dlq)
    from authnotify.messaging.topology import _declare_queue

    queue = await _declare_queue(channel, spec)
    assert queue.name == dlq
    await channel.close()
    assert "queue_declared_by_an_earlier_version" in capsys.readouterr().err


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_list_json_shape_and_leaves_the_dlq_intact_in_order(setup, amqp_connection, tmp_path, queue_type) -> None:
    settings, topology = setup
    ids = await put_dead(amqp_connection, topology, Consumer.AUTHCODE_CREATED, 5)
    canceled = await put_dead(amqp_connection, topology, Consumer.TOKEN_CANCELED, 1, reason="bad body")

    first = await dlq(settings, tmp_path, "list", "--json")
    assert first.code == 0, first.stderr
    listed = first.json()
    assert [entry["id"] for entry in listed] == ids + canceled
    assert listed[0] == {
        "id": ids[0], "queue": "authcode-created", "provider": "ams", "notifyType": "AUTHCODE_CREATED",
        "attempts": 3, "reason": "applyToken answered F: INVALID_CODE", "deadLetteredAt": "2026-11-23T10:00:05.000Z",
        "merchant": None,
    }
    assert listed[-1]["queue"] == "token-canceled" and listed[-1]["reason"] == "bad body"

    again = await dlq(settings, tmp_path, "list", "authcode-created", "--json")
    assert [entry["id"] for entry in again.json()] == ids  # QUEUE narrows; looking twice changes nothing

    remaining = await drain(amqp_connection, topology.dead_letter_queue(Consumer.AUTHCODE_CREATED))
    assert [m.message_id for m in remaining] == ids
    assert all(m.body == body_for(i) for i, m in enumerate(remaining))


async def test_list_table_is_readable_and_shows_no_body(setup, amqp_connection, tmp_path) -> None:
    settings, topology = setup
    ids = await put_dead(amqp_connection, topology, Consumer.AUTHCODE_CREATED, 2)
    result = await dlq(settings, tmp_path, "list")
    assert result.code == 0, result.stderr
    for word in ("id", "queue", "provider", "notifyType", "attempts", "reason", "deadLetteredAt"):
        assert word in result.stdout
    assert ids[0] in result.stdout and "authcode-created" in result.stdout and "INVALID_CODE" in result.stdout
    assert AUTH_CODE not in result.stdout
    assert result.stderr == ""

    empty = await dlq(settings, tmp_path, "list", "token-created")
    assert empty.code == 0 and "no dead-lettered messages" in empty.stdout


async def test_list_shows_messages_the_broker_dead_lettered(setup, amqp_connection, tmp_path) -> None:
    settings, topology = setup
    channel = await amqp_connection.channel(publisher_confirms=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b"{}", message_id="poison-1", headers={h.PROVIDER: "aps", h.NOTIFY_TYPE: "TOKEN_CREATED",
                                                                 h.ATTEMPT: 1}),
        routing_key=topology.consumer_queue(Consumer.TOKEN_CREATED),
    )
    queue = await channel.get_queue(topology.consumer_queue(Consumer.TOKEN_CREATED), ensure=False)
    message = await queue.get(no_ack=False)
    await message.reject(requeue=False)  # the quorum queue dead-letters it itself, with x-death
    await wait_for(lambda: _has(amqp_connection, topology.dead_letter_queue(Consumer.TOKEN_CREATED)), what="x-death")

    [entry] = (await dlq(settings, tmp_path, "list", "token-created", "--json")).json()
    assert entry["id"] == "poison-1" and entry["provider"] == "aps" and entry["queue"] == "token-created"
    assert entry["reason"] == "rejected"
    assert entry["attempts"] >= 1 and entry["deadLetteredAt"]

    assert len(await replay(settings, ["token-created"])) == 1
    [back] = await drain(amqp_connection, topology.consumer_queue(Consumer.TOKEN_CREATED))
    assert "x-death" not in back.headers
    assert back.headers[h.HISTORY] == [{"reason": "rejected", "attempts": entry["attempts"],
                                        "queue": "token-created", "at": entry["deadLetteredAt"]}]


async def _has(connection: aio_pika.abc.AbstractConnection, queue_name: str) -> bool:
    return await depth(connection, queue_name) > 0


# --- replay ----------------------------------------------------------------------------------------


async def test_replay_by_queue_moves_back_with_history_and_attempt_reset(setup, amqp_connection, tmp_path) -> None:
    settings, topology = setup
    ids = await put_dead(amqp_connection, topology, Consumer.AUTHCODE_CREATED, 2)
    other = await put_dead(amqp_connection, topology, Consumer.TOKEN_CANCELED, 1)

    result = await dlq(settings, tmp_path, "replay", "authcode-created", "--json")
    assert result.code == 0, result.stderr
    assert result.json() == {"replayed": 2}

    back = await drain(amqp_connection, topology.consumer_queue(Consumer.AUTHCODE_CREATED))
    assert [m.message_id for m in back] == ids
    for index, message in enumerate(back):
        assert message.body == body_for(index)
        headers = message.headers
        assert headers[h.ATTEMPT] == 1 and headers[h.REPLAYED] == 1
        assert headers[h.PROVIDER] == "ams" and headers[h.NOTIFY_TYPE] == "AUTHCODE_CREATED"
        assert headers[h.HISTORY] == [{"reason": "applyToken answered F: INVALID_CODE", "attempts": 3,
                                       "queue": "authcode-created", "at": "2026-11-23T10:00:05.000Z"}]
        assert not {h.DEAD_REASON, h.DEAD_ATTEMPTS, h.DEAD_QUEUE, h.DEAD_AT, h.LAST_ERROR} & set(headers)
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert await depth(amqp_connection, topology.dead_letter_queue(Consumer.AUTHCODE_CREATED)) == 0
    assert [m.message_id for m in await drain(amqp_connection, topology.dead_letter_queue(Consumer.TOKEN_CANCELED))] == other


async def test_replay_by_id_limit_and_dry_run(setup, amqp_connection, tmp_path) -> None:
    settings, topology = setup
    ids = await put_dead(amqp_connection, topology, Consumer.AUTHCODE_CREATED, 4)
    dead = topology.dead_letter_queue(Consumer.AUTHCODE_CREATED)
    live = topology.consumer_queue(Consumer.AUTHCODE_CREATED)

    dry = await dlq(settings, tmp_path, "replay", "--dry-run")
    assert dry.code == 0 and ids[3] in dry.stdout and "would replay 4 messages" in dry.stdout
    assert await depth(amqp_connection, dead) == 4 and await depth(amqp_connection, live) == 0

    # The selection logic, in-process (the CLI adds only argument parsing and output, tested above).
    would = await replay(settings, [], ids=[ids[1]], dry_run=True)
    assert [letter.id for letter in would] == [ids[1]]
    assert await depth(amqp_connection, live) == 0
    assert [x.id for x in await replay(settings, [], ids=[ids[2]])] == [ids[2]]
    limited = await dlq(settings, tmp_path, "replay", "authcode-created", "--limit", "2", "--json")
    assert limited.json() == {"replayed": 2}

    assert [m.message_id for m in await drain(amqp_connection, live)] == [ids[2], ids[0], ids[1]]
    assert [m.message_id for m in await drain(amqp_connection, dead)] == [ids[3]]

    unknown = await dlq(settings, tmp_path, "replay", "--id", "no-such-id", "--json")
    assert unknown.code == 1 and unknown.json() == {"replayed": 0}
    assert unknown.stderr.strip().count("\n") == 0 and "no-such-id" in unknown.stderr


async def test_replayed_message_that_fails_again_is_dead_lettered_with_its_history(
    setup, amqp_connection, tmp_path
) -> None:
    settings, topology = setup
    contexts: list[MessageContext] = []

    async def refuse(_parsed: Any, context: MessageContext) -> None:
        contexts.append(context)
        raise PermanentError(f"refused {len(contexts)}")

    runtime = Workers(settings, [ConsumerSpec(Consumer.TOKEN_CREATED, lambda body, _c: body, refuse)])
    await runtime.start()
    try:
        await runtime.wait_ready(WAIT_SECONDS)
        channel = await amqp_connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.notifications_exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(b'{"x":1}', message_id="again-1", headers={h.PROVIDER: "aps", h.ATTEMPT: 1}),
            routing_key="aps.TOKEN_CREATED",
        )
        dead_queue = topology.dead_letter_queue(Consumer.TOKEN_CREATED)
        await wait_for(lambda: _has(amqp_connection, dead_queue), what="first death")
        [first] = await list_dead_letters(settings, [])
        assert [x.id for x in await replay(settings, ["token-created"])] == ["again-1"]
        await wait_for(lambda: _count_is(contexts, 2), what="handled again")
        await wait_for(lambda: _has(amqp_connection, dead_queue), what="second death")
    finally:
        await runtime.stop()

    assert contexts[1].attempt == 1 and contexts[1].possibly_seen_before is True
    [again] = await drain(amqp_connection, dead_queue)
    assert again.body == b'{"x":1}' and again.message_id == "again-1"
    assert again.headers[h.DEAD_REASON] == "refused 2"
    assert again.headers[h.REPLAYED] == 1
    assert again.headers[h.HISTORY] == [{"reason": "refused 1", "attempts": 1, "queue": "token-created",
                                         "at": first.deadLetteredAt}]


async def _count_is(items: list[Any], count: int) -> bool:
    return len(items) >= count


async def test_interrupted_replay_loses_nothing(setup, amqp_connection, tmp_path) -> None:
    settings, topology = setup
    total = 1500
    ids = await put_dead(amqp_connection, topology, Consumer.AUTHCODE_CREATED, total)
    dead = topology.dead_letter_queue(Consumer.AUTHCODE_CREATED)
    live = topology.consumer_queue(Consumer.AUTHCODE_CREATED)

    process = await start_cli(settings, tmp_path, "replay", "--json")
    await wait_for(lambda: _depth_at_least(amqp_connection, live, 50), what="replay under way")
    process.send_signal(signal.SIGKILL)
    await process.wait()

    # Once the broker has noticed the dead client, its unacked messages are back in the DLQ.
    async def all_accounted() -> bool:
        return await depth(amqp_connection, dead) + await depth(amqp_connection, live) >= total

    await wait_for(all_accounted, what="every message in the DLQ or the consumer queue")
    moved = await drain(amqp_connection, live)
    remaining = await drain(amqp_connection, dead)
    assert 0 < len(moved) < total, "the replay was interrupted half-way"
    assert {m.message_id for m in moved} | {m.message_id for m in remaining} == set(ids)
    assert [m.message_id for m in remaining] == [i for i in ids if i in {m.message_id for m in remaining}]


async def _depth_at_least(connection: aio_pika.abc.AbstractConnection, queue_name: str, count: int) -> bool:
    return await depth(connection, queue_name) >= count


# --- filters: --merchant, --since, --reason ----------------------------------------------------------


def event_body(merchant: str, client: str = "2188001") -> Callable[[int], bytes]:
    """A merchant event's body, as merchant-events dead-letters it."""
    return lambda index: orjson.dumps({"id": f"msg_{merchant}_{index}", "type": "authorization.activated",
                                       "createdAt": "2026-11-23T08:00:00Z",
                                       "data": {"provider": "aps", "authClientId": client,
                                                "referenceMerchantId": merchant}})


async def test_list_and_replay_take_the_merchant_since_and_reason_filters(setup, amqp_connection, tmp_path) -> None:
    settings, topology = setup
    early = await put_dead(amqp_connection, topology, Consumer.MERCHANT_EVENTS, 2, reason="merchant answered 503",
                           dead_at="2026-11-23T08:59:59.000Z", body=event_body("M-1"))
    late = await put_dead(amqp_connection, topology, Consumer.MERCHANT_EVENTS, 2, reason="merchant answered 503",
                          dead_at="2026-11-23T09:30:00.000Z", body=event_body("M-1"))
    other = await put_dead(amqp_connection, topology, Consumer.MERCHANT_EVENTS, 1, reason="Merchant TIMED OUT",
                           dead_at="2026-11-23T09:30:00.000Z", body=event_body("M-2"))
    notifications = await put_dead(amqp_connection, topology, Consumer.AUTHCODE_CREATED, 1,
                                   dead_at="2026-11-23T09:30:00.000Z")

    listed = (await dlq(settings, tmp_path, "list", "--json")).json()
    assert {entry["id"]: entry["merchant"] for entry in listed} == {
        **dict.fromkeys(early + late, "M-1"), other[0]: "M-2", notifications[0]: None}
    by_merchant = await dlq(settings, tmp_path, "list", "--merchant", "M-1", "--since", "2026-11-23T09:00:00Z", "--json")
    assert [entry["id"] for entry in by_merchant.json()] == late
    by_reason = await dlq(settings, tmp_path, "list", "merchant-events", "--reason", "timed out", "--json")
    assert [entry["id"] for entry in by_reason.json()] == other
    local_time = await dlq(settings, tmp_path, "list", "--since", "2026-11-23T17:00:00+08:00", "--json")
    assert {entry["id"] for entry in local_time.json()} == {*late, *other, *notifications}
    table = await dlq(settings, tmp_path, "list", "--merchant", "M-2")
    assert "merchant" in table.stdout and "M-2" in table.stdout and late[0] not in table.stdout

    # "Replay everything that died for merchant M-1 since 09:00", and nothing else.
    replayed = await dlq(settings, tmp_path, "replay", "--merchant", "M-1", "--since", "2026-11-23T09:00", "--json")
    assert replayed.code == 0 and replayed.json() == {"replayed": 2}
    assert [m.message_id for m in await drain(amqp_connection, topology.consumer_queue(Consumer.MERCHANT_EVENTS))] == late
    filtered_out = await dlq(settings, tmp_path, "replay", "--id", other[0], "--merchant", "M-1", "--json")
    assert filtered_out.code == 1 and filtered_out.json() == {"replayed": 0}
    assert "among the filtered dead letters" in filtered_out.stderr and other[0] in filtered_out.stderr
    remaining = await drain(amqp_connection, topology.dead_letter_queue(Consumer.MERCHANT_EVENTS))
    assert [m.message_id for m in remaining] == early + other


@pytest.mark.slow  # starts the command line three times
@pytest.mark.parametrize("args", [["list", "--since", "soon"], ["replay", "--since", "2026-11-31"],
                                  ["replay", "--limit", "0"]])
async def test_a_bad_filter_is_one_line_and_exit_2_before_the_broker_is_asked(tmp_path, args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "dlq", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env | {"AUTHNOTIFY_RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1/"},
        cwd=tmp_path)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2 and stdout == b""
    assert len(stderr.decode().strip().splitlines()) == 1 and "unreachable" not in stderr.decode()


# --- purge and failures --------------------------------------------------------------------------------


async def test_purge_needs_yes_and_deletes_what_was_asked(setup, amqp_connection, tmp_path) -> None:
    settings, topology = setup
    ids = await put_dead(amqp_connection, topology, Consumer.AUTHCODE_CREATED, 3)
    other = await put_dead(amqp_connection, topology, Consumer.MERCHANT_EVENTS, 2)
    dead = topology.dead_letter_queue(Consumer.AUTHCODE_CREATED)

    refused = await dlq(settings, tmp_path, "purge")
    assert refused.code != 0 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "--yes" in refused.stderr
    assert await depth(amqp_connection, dead) == 3

    by_id = await dlq(settings, tmp_path, "purge", "--id", ids[1], "--yes", "--json")
    assert by_id.json() == {"purged": 1}
    assert [m.message_id for m in await drain(amqp_connection, dead)] == [ids[0], ids[2]]

    everything = await dlq(settings, tmp_path, "purge", "merchant-events", "--yes", "--json")
    assert everything.json() == {"purged": len(other)}
    assert await depth(amqp_connection, topology.dead_letter_queue(Consumer.MERCHANT_EVENTS)) == 0

    human = await dlq(settings, tmp_path, "purge", "--yes")
    assert human.code == 0 and "purged 0 messages" in human.stdout


@pytest.mark.parametrize("command", [["list"], ["replay", "--json"]])
async def test_broker_unreachable_is_one_line(make_settings, tmp_path, command: list[str]) -> None:
    settings = make_settings()
    env = cli_env(settings) | {"AUTHNOTIFY_RABBITMQ_URL": "amqp://guest:secret@127.0.0.1:1/"}
    result = await dlq(settings, tmp_path, *command, env=env)
    assert result.code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "broker unreachable" in lines[0] and "secret" not in lines[0]
