"""``authnotify dlq list|replay|purge`` (contract section 2): the dead-letter queues, operated safely.

Reading a dead-letter queue without consuming it: AMQP has no "peek", so each queue is read with
``basic.get`` and manual acknowledgement, at most as many messages as the queue held when we looked, and
nothing is acked; closing the channel then gives every message back to the broker, which keeps their order
(the redelivered flag is set, which the DLQ does not care about). Replay publishes each chosen message to
its consumer queue with a publisher confirm and acks it in the DLQ only after the confirm, so a replay
interrupted at any point leaves every message in the DLQ, in the consumer queue, or (at worst, between the
confirm and the ack) in both; the handlers are idempotent. Messages not chosen are never acked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from authnotify.cli.admin import connect_once
from authnotify.cli.main import EXIT_USAGE, CommandError
from authnotify.messaging import headers as h
from authnotify.config.settings import Settings
from authnotify.messaging.topology import Consumer, Topology, build_topology, declare_topology

GET_TIMEOUT_SECONDS = 10
PUBLISH_TIMEOUT_SECONDS = 10
# Headers the broker adds when it dead-letters or redelivers; a replayed message starts clean of them.
_BROKER_HEADERS = ("x-death", "x-delivery-count", "x-first-death-exchange", "x-first-death-queue",
                   "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")
_DEAD_HEADERS = (h.DEAD_REASON, h.DEAD_ATTEMPTS, h.DEAD_QUEUE, h.DEAD_AT, h.LAST_ERROR)


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message as ``dlq list --json`` shows it."""

    id: str
    queue: str
    provider: str | None
    notifyType: str | None
    attempts: int | None
    reason: str | None
    deadLetteredAt: str | None


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _broker_death(headers: dict[str, Any]) -> dict[str, Any] | None:
    """The broker's own dead-lettering (quorum delivery limit, a reject) from the x-death list, newest first.

    Retries pass through delay queues that dead-letter by TTL ("expired"): those entries are not deaths.
    """
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths:
        return None
    for entry in deaths:
        if isinstance(entry, dict) and _iso(entry.get("reason")) != "expired":
            return entry
    return None


def describe(message: AbstractIncomingMessage, consumer: Consumer) -> DeadLetter:
    headers = dict(message.headers or {})
    death = death_of(message, consumer)
    return DeadLetter(
        id=message_key(message),
        queue=consumer.value,
        provider=h.header_str(headers, h.PROVIDER),
        notifyType=h.header_str(headers, h.NOTIFY_TYPE),
        attempts=death["attempts"],
        reason=death["reason"],
        deadLetteredAt=death["at"],
    )


def death_of(message: AbstractIncomingMessage, consumer: Consumer) -> dict[str, Any]:
    """{reason, attempts, queue, at} of the death that put the message in its DLQ (our runtime or the broker)."""
    headers = dict(message.headers or {})
    if h.DEAD_REASON in headers:
        return {
            "reason": h.header_str(headers, h.DEAD_REASON),
            "attempts": h.header_int(headers, h.DEAD_ATTEMPTS, h.header_int(headers, h.ATTEMPT, 1)),
            "queue": h.header_str(headers, h.DEAD_QUEUE) or consumer.value,
            "at": h.header_str(headers, h.DEAD_AT),
        }
    entry = _broker_death(headers) or {}
    reason = _iso(entry.get("reason")) or "delivery_limit"
    attempts = max(h.header_int(headers, "x-delivery-count", 0), h.header_int(entry, "count", 0),
                   h.header_int(headers, h.ATTEMPT, 1))
    return {"reason": reason, "attempts": attempts, "queue": consumer.value, "at": _iso(entry.get("time"))}


def message_key(message: AbstractIncomingMessage) -> str:
    """The message id the ingress gave it; stable however often the message is looked at."""
    if message.message_id:
        return message.message_id
    import hashlib

    return "sha256:" + hashlib.sha256(message.body).hexdigest()[:32]


def replay_message(message: AbstractIncomingMessage, consumer: Consumer) -> aio_pika.Message:
    """The same body and id, attempts reset, the death appended to the history, DEAD_* removed."""
    headers = dict(message.headers or {})
    death = death_of(message, consumer)
    history = headers.get(h.HISTORY)
    history = list(history) if isinstance(history, list) else []
    history.append({key: value for key, value in death.items() if value is not None})
    for name in (*_DEAD_HEADERS, *_BROKER_HEADERS):
        headers.pop(name, None)
    headers[h.ATTEMPT] = 1
    headers[h.REPLAYED] = h.header_int(headers, h.REPLAYED, 0) + 1
    headers[h.HISTORY] = history
    return h.copy_with_headers(message, headers)


# --- reading a DLQ ----------------------------------------------------------------------------------


@asynccontextmanager
async def _broker(settings: Settings) -> AsyncIterator[tuple[aio_pika.abc.AbstractConnection, Topology]]:
    topology = build_topology(settings)
    connection = await connect_once(settings)
    try:
        channel = await connection.channel()
        try:
            await declare_topology(channel, topology)  # every process does; the DLQs then exist
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            raise CommandError(f"authnotify: a queue exists with other arguments: {exc}") from None
        await channel.close()
        yield connection, topology
    finally:
        await connection.close()


async def _held_messages(channel: AbstractChannel, queue_name: str) -> AsyncIterator[AbstractIncomingMessage]:
    """Every message the queue holds now, fetched unacked: closing the channel gives them all back in order."""
    queue = await channel.declare_queue(queue_name, passive=True)
    count = queue.declaration_result.message_count or 0
    for _ in range(count):
        message = await queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT_SECONDS)
        if message is None:
            return
        yield message


async def _queue_depth(channel: AbstractChannel, queue_name: str) -> int:
    queue = await channel.declare_queue(queue_name, passive=True)
    return queue.declaration_result.message_count or 0


def _consumers(names: Iterable[str]) -> list[Consumer]:
    chosen = [Consumer(name) for name in dict.fromkeys(names)]
    return chosen or list(Consumer)


def _progress(description: str) -> Progress:
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


class _Selection:
    """--id and --limit: which messages an operation takes."""

    def __init__(self, ids: Iterable[str], limit: int | None) -> None:
        self.ids = set(ids)
        self.limit = limit
        self.taken = 0

    def wants(self, message_id: str) -> bool:
        if self.limit is not None and self.taken >= self.limit:
            return False
        return not self.ids or message_id in self.ids

    @property
    def full(self) -> bool:
        return self.limit is not None and self.taken >= self.limit


# --- commands ------------------------------------------------------------------------------------


async def list_dead_letters(settings: Settings, names: Iterable[str]) -> list[DeadLetter]:
    found: list[DeadLetter] = []
    async with _broker(settings) as (connection, topology):
        for consumer in _consumers(names):
            channel = await connection.channel()
            try:
                async for message in _held_messages(channel, topology.dead_letter_queue(consumer)):
                    found.append(describe(message, consumer))
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()  # nothing acked: every message goes back, in order
    return found


async def replay(settings: Settings, names: Iterable[str], *, ids: Iterable[str] = (), limit: int | None = None,
                 dry_run: bool = False) -> list[DeadLetter]:
    """Moves the chosen messages back to their consumer queues; returns what was (or would be) replayed."""
    selection = _Selection(ids, limit)
    replayed: list[DeadLetter] = []
    async with _broker(settings) as (connection, topology):
        with _progress("replaying") as progress:
            for consumer in _consumers(names):
                if selection.full:
                    break
                dlq = topology.dead_letter_queue(consumer)
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                try:
                    task = progress.add_task(consumer.value, total=await _queue_depth(channel, dlq))
                    async for message in _held_messages(channel, dlq):
                        progress.advance(task)
                        if not selection.wants(message_key(message)):
                            continue  # left unacked: back in the DLQ, in place, when the channel closes
                        selection.taken += 1
                        replayed.append(describe(message, consumer))
                        if dry_run:
                            continue
                        confirmation = await channel.default_exchange.publish(
                            replay_message(message, consumer), routing_key=topology.consumer_queue(consumer),
                            mandatory=True, timeout=PUBLISH_TIMEOUT_SECONDS,
                        )
                        if confirmation is not None and not isinstance(confirmation, aiormq.spec.Basic.Ack):
                            raise CommandError(f"authnotify: the broker refused a replayed message ({consumer.value})")
                        await message.ack()  # only now: the copy in the consumer queue is confirmed
                        if selection.full:
                            break
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
    return replayed


async def purge(settings: Settings, names: Iterable[str], *, ids: Iterable[str] = ()) -> int:
    selection = _Selection(ids, None)
    purged = 0
    async with _broker(settings) as (connection, topology):
        with _progress("purging") as progress:
            for consumer in _consumers(names):
                dlq = topology.dead_letter_queue(consumer)
                channel = await connection.channel()
                try:
                    if not selection.ids:
                        queue = await channel.declare_queue(dlq, passive=True)
                        result = await queue.purge()
                        purged += result.message_count or 0
                        continue
                    task = progress.add_task(consumer.value, total=await _queue_depth(channel, dlq))
                    async for message in _held_messages(channel, dlq):
                        progress.advance(task)
                        if selection.wants(message_key(message)):
                            await message.ack()
                            purged += 1
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
    return purged


# --- output --------------------------------------------------------------------------------------------


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, ensure_ascii=False) + "\n")


def _table(letters: list[DeadLetter], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("id", "queue", "provider", "notifyType", "attempts", "reason", "deadLetteredAt"):
        table.add_column(column, overflow="fold", no_wrap=column in ("id", "deadLetteredAt"))
    for letter in letters:
        table.add_row(*("" if value is None else str(value) for value in asdict(letter).values()))
    return table


def _print_table(letters: list[DeadLetter], title: str) -> None:
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(_table(letters, title))


async def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return await _run(settings, args)
    except (aio_pika.exceptions.AMQPError, ConnectionError, asyncio.TimeoutError) as exc:
        # Whatever was replayed before this is confirmed; the rest is still in its DLQ.
        raise CommandError(f"authnotify: broker connection lost during dlq {args.dlq_command} "
                           f"({type(exc).__name__})") from None


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    names: list[str] = list(args.queues or [])
    if args.dlq_command == "list":
        letters = await list_dead_letters(settings, names)
        if args.json:
            _print_json([asdict(letter) for letter in letters])
        elif letters:
            _print_table(letters, f"{len(letters)} dead-lettered message{'s' if len(letters) != 1 else ''}")
        else:
            print("no dead-lettered messages")
        return 0
    if args.dlq_command == "replay":
        letters = await replay(settings, names, ids=args.ids, limit=args.limit, dry_run=args.dry_run)
        missing = [] if args.limit else sorted(set(args.ids) - {letter.id for letter in letters})
        if args.json:
            _print_json({"replayed": len(letters)})
        else:
            if letters:
                _print_table(letters, "would replay" if args.dry_run else "replayed")
            verb = "would replay" if args.dry_run else "replayed"
            print(f"{verb} {len(letters)} message{'s' if len(letters) != 1 else ''}")
        if missing:
            print(f"authnotify: not found in the dead-letter queues: {', '.join(missing)}", file=sys.stderr)
            return 1
        return 0
    if args.dlq_command == "purge":
        if not args.yes:
            raise CommandError("authnotify: dlq purge deletes messages for good; add --yes to confirm", EXIT_USAGE)
        count = await purge(settings, names, ids=args.ids)
        if args.json:
            _print_json({"purged": count})
        else:
            print(f"purged {count} message{'s' if count != 1 else ''}")
        return 0
    raise CommandError(f"authnotify: unknown dlq command {args.dlq_command}", EXIT_USAGE)  # pragma: no cover
