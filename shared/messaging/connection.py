"""Connections to the broker: the robust one every service holds, and the plain one a command opens.

aio-pika's robust connection reconnects and restores channels, exchanges, queues and consumers after the
broker comes back; the first connection, which aio-pika does not retry, is retried here so a process can
start (and answer ``/readyz`` 503) before the broker does. A command instead fails fast, in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from authnotify.errors import CommandError
from authnotify.messaging.topology import Topology, declare_topology
from authnotify.observability.logging import get_logger
from authnotify.observability.redaction import mask_url

log = get_logger("authnotify.broker")

RECONNECT_INTERVAL_SECONDS = 1.0
FIRST_CONNECT_MAX_BACKOFF_SECONDS = 5.0
COMMAND_CONNECT_TIMEOUT_SECONDS = 10.0


class BrokerUnreachable(CommandError):
    def __init__(self, url: str, error: BaseException) -> None:
        super().__init__(f"authnotify: broker unreachable at {url} ({type(error).__name__})")
        self.url = url  # the password masked
        self.reason = "timed out" if isinstance(error, asyncio.TimeoutError) else type(error).__name__


async def connect_once(url: str, *, timeout: float = COMMAND_CONNECT_TIMEOUT_SECONDS) -> aio_pika.abc.AbstractConnection:
    """A plain connection for a command: :class:`BrokerUnreachable` (one line) instead of retrying."""
    try:
        return await aio_pika.connect(url, timeout=timeout)
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
        raise BrokerUnreachable(mask_url(url), exc) from None


@asynccontextmanager
async def command_connection(url: str, topology: Topology) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A command's connection, with the namespace's topology declared (as every process does on start);
    queues that exist with other arguments are one line, not a traceback."""
    connection = await connect_once(url)
    try:
        channel = await connection.channel()
        try:
            await declare_topology(channel, topology)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            raise CommandError(f"authnotify: a queue exists with other arguments: {exc}") from None
        await channel.close()
        yield connection
    finally:
        await connection.close()


class Broker:
    """One robust connection, opened in the background, declaring the topology on first connect."""

    def __init__(self, url: str, topology: Topology, *, connection_name: str) -> None:
        self._url = url
        self._topology = topology
        self._connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_connect: list[Callable[[AbstractRobustConnection], Awaitable[None]]] = []

    @classmethod
    def on_connection(cls, connection: aio_pika.abc.AbstractConnection, topology: Topology) -> Broker:
        """A broker on a connection a command already opened (with :func:`connect_once`): nothing is retried."""
        broker = cls("", topology, connection_name="command")
        broker._connection = connection  # type: ignore[assignment]  # plain, not robust: commands fail fast
        broker._connected.set()
        return broker

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def connection(self) -> AbstractRobustConnection | None:
        return self._connection if self._connected.is_set() else None

    def on_first_connect(self, callback: Callable[[AbstractRobustConnection], Awaitable[None]]) -> None:
        """Runs once the connection exists (robust channels made there are restored by aio-pika)."""
        self._on_connect.append(callback)

    def start(self) -> None:
        if self._task is None and not self._connected.is_set():
            self._task = asyncio.create_task(self._connect_until_connected(), name="broker-connect")

    async def wait_connected(self, timeout: float | None = None) -> AbstractRobustConnection:
        self.start()
        await asyncio.wait_for(self._connected.wait(), timeout)
        assert self._connection is not None
        return self._connection

    @property
    def is_open(self) -> bool:
        connection = self.connection
        return (connection is not None and not connection.is_closed
                and not getattr(connection, "reconnecting", False))

    async def _connect_until_connected(self) -> None:
        backoff = 0.2
        while True:
            try:
                connection = await aio_pika.connect_robust(
                    self._url,
                    client_properties={"connection_name": self._connection_name},
                    reconnect_interval=RECONNECT_INTERVAL_SECONDS,
                    timeout=10,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every connect failure means: try again shortly
                log.warning("broker_unreachable", error=type(exc).__name__, retry_in=round(backoff, 1))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, FIRST_CONNECT_MAX_BACKOFF_SECONDS)
                continue
            try:
                channel = await connection.channel()
                await declare_topology(channel, self._topology)
                await channel.close()
                for callback in self._on_connect:
                    await callback(connection)
            except asyncio.CancelledError:
                await connection.close()
                raise
            except Exception as exc:
                log.warning("broker_setup_failed", error=type(exc).__name__, detail=str(exc)[:200])
                with contextlib.suppress(Exception):
                    await connection.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, FIRST_CONNECT_MAX_BACKOFF_SECONDS)
                continue
            self._connection = connection
            self._connected.set()
            log.info("broker_connected", connection=self._connection_name)
            return

    async def channel(self, *, publisher_confirms: bool = True, on_return_raises: bool = False,
                      prefetch_count: int | None = None) -> AbstractRobustChannel:
        connection = await self.wait_connected()
        channel = await connection.channel(
            publisher_confirms=publisher_confirms, on_return_raises=on_return_raises
        )
        if prefetch_count is not None:
            await channel.set_qos(prefetch_count=prefetch_count)
        return channel

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._connected.clear()
