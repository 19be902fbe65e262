"""Publishing a notification with publisher confirms, bounded in flight, never waiting on a dead broker.

The ingress may answer SUCCESS only after :meth:`NotificationPublisher.publish` returns: the broker has then
confirmed the message durably (persistent, to durable queues) and routed it (``mandatory`` with a channel
that raises on a return). Every failure raises :class:`PublishFailed` quickly: when the connection or channel
is down the publish is not even tried, because a robust aio-pika channel would wait for the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractRobustChannel
from aiormq import spec

from authnotify.messaging.connection import Broker
from authnotify.observability.logging import get_logger
from authnotify.messaging.headers import JSON_CONTENT_TYPE
from authnotify.observability.metrics import PUBLISH_CONFIRM_SECONDS

log = get_logger("authnotify.ingress")

# Alipay+ gives up on an answer after 5 s and the contract allows no answer over 5 s: the confirm wait
# leaves room for reading the request and writing the answer.
CONFIRM_TIMEOUT_SECONDS = 4.5
CHANNEL_RETRY_SECONDS = 1.0
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


class PublishFailed(Exception):
    """The broker did not confirm the message (down, nacked, returned or too slow); str is the reason."""


class InflightLimit:
    """Publishes awaiting a confirm; beyond ``maximum`` the ingress answers 429 instead of queueing."""

    __slots__ = ("maximum", "current")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.current = 0

    def try_acquire(self) -> bool:
        if self.current >= self.maximum:
            return False
        self.current += 1
        return True

    def release(self) -> None:
        self.current -= 1


class NotificationPublisher:
    """Owns the ingress's confirming channel on the shared :class:`Broker` connection."""

    def __init__(self, broker: Broker, *, max_inflight: int,
                 confirm_timeout: float = CONFIRM_TIMEOUT_SECONDS) -> None:
        self._broker = broker
        self._exchange_name = broker.topology.notifications_exchange
        self._confirm_timeout = confirm_timeout
        self.inflight = InflightLimit(max_inflight)
        self._channel: AbstractRobustChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._confirm_seconds = PUBLISH_CONFIRM_SECONDS  # looked up once, not per publish
        self._opener: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Opens the channel in the background: the ingress serves (503) before the broker is there."""
        self._broker.start()
        if self._opener is None:
            self._opener = asyncio.create_task(self._open_channel(), name="ingress-channel")

    async def _open_channel(self) -> None:
        while True:
            try:
                channel = await self._broker.channel(publisher_confirms=True, on_return_raises=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection dropped while opening: try again
                log.warning("ingress_channel_failed", error=type(exc).__name__)
                await asyncio.sleep(CHANNEL_RETRY_SECONDS)
                continue
            channel.close_callbacks.add(self._on_channel_closed)
            channel.reopen_callbacks.add(self._on_channel_reopened)
            self._channel = channel
            log.info("ingress_channel_open")
            return

    def _on_channel_closed(self, _channel: Any, exc: BaseException | None = None) -> None:
        log.warning("ingress_channel_lost", error=type(exc).__name__ if exc else None)

    def _on_channel_reopened(self, _channel: Any) -> None:
        log.info("ingress_channel_restored")

    @property
    def ready(self) -> bool:
        """True while the broker connection and our channel are open."""
        channel = self._channel
        return channel is not None and not channel.is_closed and self._broker.is_open

    async def publish(self, body: bytes, *, routing_key: str, message_id: str,
                      headers: dict[str, Any]) -> None:
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
        # Properties built directly: aio_pika.Message costs ~100 µs more per publish for the same frame.
        properties = spec.Basic.Properties(
            message_id=message_id,
            content_type=JSON_CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            headers=headers,
        )
        started = time.perf_counter()
        try:
            # timeout: aiormq bounds the whole publish and confirm wait itself (one timer, not two).
            # wait=False: the channel lock is not held until the frame reaches the socket, so concurrent
            # publishes queue their frames instead of taking turns with the writer task; the confirm is
            # still awaited, and a connection lost before the write fails the confirmation.
            await underlay.basic_publish(
                body, exchange=self._exchange_name, routing_key=routing_key,
                properties=properties, mandatory=True, timeout=self._confirm_timeout,
                wait=False,  # type: ignore[call-arg]  # aiormq's Channel has it; its abstract class does not
            )
        except TimeoutError:
            raise PublishFailed(f"no confirm within {self._confirm_timeout:g}s") from None
        except aio_pika.exceptions.PublishError:  # a subclass of DeliveryError: test it first
            raise PublishFailed("returned unroutable by the broker") from None
        except aio_pika.exceptions.DeliveryError:
            raise PublishFailed("nacked by the broker") from None
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
