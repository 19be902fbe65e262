"""The one confirmed publisher: every message authnotify sends goes through :class:`ConfirmedPublisher`.

:meth:`ConfirmedPublisher.publish` returns only when the broker has confirmed the message durably
(persistent, to durable queues) and routed it (``mandatory`` on a channel that raises on a return). Every
failure raises :class:`~authnotify.errors.PublishFailed` quickly: when the connection or the channel is down
the publish is not even tried, because a robust aio-pika channel would wait for the reconnect.

The ingress answers Alipay only after a publish returns; the consumer runtime acks a message only after its
follow-ups (events, retries, dead letters) are published; ``dlq replay`` removes a dead letter only after its
copy is. :class:`Publisher` is the interface they depend on, so tests can put an in-memory one in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractRobustChannel

from authnotify.errors import PublishFailed
from authnotify.messaging.connection import Broker
from authnotify.messaging.messages import OutgoingMessage
from authnotify.observability.logging import get_logger
from authnotify.observability.metrics import PUBLISH_CONFIRM_SECONDS

log = get_logger("authnotify.publisher")

CHANNEL_RETRY_SECONDS = 1.0


class Publisher(Protocol):
    @property
    def ready(self) -> bool:
        """True while a publish can be tried (broker connection and channel open)."""
        ...

    async def publish(self, message: OutgoingMessage, *, exchange: str, routing_key: str) -> None:
        """Returns once the broker confirmed the message; :class:`PublishFailed` otherwise."""
        ...


class ConfirmedPublisher:
    """A confirming channel of its own on a :class:`Broker` connection, opened in the background."""

    def __init__(self, broker: Broker, *, name: str, confirm_timeout: float) -> None:
        self._broker = broker
        self._name = name
        self._confirm_timeout = confirm_timeout
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._opened = asyncio.Event()
        self._opener: asyncio.Task[None] | None = None
        self._confirm_seconds = PUBLISH_CONFIRM_SECONDS  # looked up once, not per publish

    def start(self) -> None:
        """Starts opening the channel; a process can serve (and answer not-ready) before the broker is up."""
        self._broker.start()
        if self._opener is None:
            self._opener = asyncio.create_task(self._open_channel(), name=f"{self._name}-channel")

    async def wait_ready(self, timeout: float | None = None) -> None:
        self.start()
        await asyncio.wait_for(self._opened.wait(), timeout)

    async def _open_channel(self) -> None:
        while True:
            try:
                channel = await self._broker.channel(publisher_confirms=True, on_return_raises=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection dropped while opening: try again
                log.warning("publish_channel_failed", publisher=self._name, error=type(exc).__name__)
                await asyncio.sleep(CHANNEL_RETRY_SECONDS)
                continue
            channel.close_callbacks.add(self._on_channel_closed)
            if isinstance(channel, AbstractRobustChannel):  # a command's plain channel is never reopened
                channel.reopen_callbacks.add(self._on_channel_reopened)
            self._channel = channel
            self._opened.set()
            log.info("publish_channel_open", publisher=self._name)
            return

    def _on_channel_closed(self, _channel: Any, exc: BaseException | None = None) -> None:
        log.warning("publish_channel_lost", publisher=self._name, error=type(exc).__name__ if exc else None)

    def _on_channel_reopened(self, _channel: Any) -> None:
        log.info("publish_channel_restored", publisher=self._name)

    @property
    def ready(self) -> bool:
        channel = self._channel
        return channel is not None and not channel.is_closed and self._broker.is_open

    async def publish(self, message: OutgoingMessage, *, exchange: str, routing_key: str) -> None:
        channel = self._channel
        if channel is None or not self.ready:
            raise PublishFailed("broker unavailable")
        # The aiormq channel under our robust channel (opened with confirms and on_return_raises), kept
        # until it closes: a reconnect replaces it, and asking the robust channel costs a coroutine each time.
        underlay = self._underlay
        if underlay is None or underlay.is_closed:
            try:  # the robust channel waits for a reconnect here: bounded like the confirm
                async with asyncio.timeout(self._confirm_timeout):
                    underlay = self._underlay = await channel.get_underlay_channel()
            except TimeoutError:
                raise PublishFailed("broker unavailable") from None
            except Exception as exc:
                raise PublishFailed(f"publish failed: {type(exc).__name__}") from None
        started = time.perf_counter()
        try:
            # timeout: aiormq bounds the whole publish and confirm wait itself (one timer, not two).
            # wait=False: the channel lock is not held until the frame reaches the socket, so concurrent
            # publishes queue their frames instead of taking turns with the writer task; the confirm is
            # still awaited, and a connection lost before the write fails the confirmation.
            await underlay.basic_publish(
                message.body, exchange=exchange, routing_key=routing_key,
                properties=message.properties, mandatory=True, timeout=self._confirm_timeout,
                wait=False,  # type: ignore[call-arg]  # aiormq's Channel has it; its abstract class does not
            )
        except TimeoutError:
            raise PublishFailed(f"no confirm within {self._confirm_timeout:g}s") from None
        except aio_pika.exceptions.PublishError:  # a subclass of DeliveryError: test it first
            raise PublishFailed("returned unroutable by the broker") from None
        except aio_pika.exceptions.DeliveryError:
            raise PublishFailed("nacked by the broker") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # connection or channel lost while waiting for the confirm
            raise PublishFailed(f"publish failed: {type(exc).__name__}") from None
        self._confirm_seconds.observe(time.perf_counter() - started)

    async def close(self) -> None:
        if self._opener is not None and not self._opener.done():
            self._opener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._opener
        if self._channel is not None:
            self._channel.close_callbacks.discard(self._on_channel_closed)  # our own close is no loss
            with contextlib.suppress(Exception):
                await self._channel.close()
        self._channel = None
        self._underlay = None
        self._opened.clear()
