"""One process's life, for every service: run until SIGTERM or SIGINT (or a part fails), then drain.

Each part registers how it stops when it has started; on the way out the parts stop in reverse order, so
the last one started (the ingress's listener, say) is the first to stop taking work, and what it depends on
(the workers, the broker connection) is still there while it finishes what it holds. Every stop callback
runs even when an earlier one fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from authnotify.errors import CommandError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LISTEN_BACKLOG = 1024


def listen(host: str, port: int, *, backlog: int = LISTEN_BACKLOG, reuse_port: bool = False) -> socket.socket:
    """Binds now, so a port in use fails with one line before anything else starts. With ``reuse_port``
    several processes listen on the same port (SO_REUSEPORT) and the kernel spreads connections over them."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    try:
        return socket.create_server(address, family=family, backlog=backlog, reuse_port=reuse_port)
    except OSError as exc:
        raise _cannot_listen(host, port, exc) from None


def check_shared_port(host: str, port: int) -> None:
    """Fails with one line unless processes can share ``host:port`` (SO_REUSEPORT); binds without listening,
    so no connection is ever taken here."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as socket.create_server does
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise _cannot_listen(host, port, exc) from None


def _cannot_listen(host: str, port: int, exc: OSError) -> CommandError:
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return CommandError(f"authnotify: cannot listen on {host}:{port} ({reason})")


class Lifecycle:
    """``async with Lifecycle() as life``: start parts, :meth:`on_stop` each, then :meth:`run_until_stopped`."""

    def __init__(self) -> None:
        self.stop_requested = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self._failures: list[asyncio.Future[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Lifecycle:
        self._loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            self._loop.add_signal_handler(signum, self.stop_requested.set)
        await self._stack.__aenter__()
        return self

    def on_stop(self, callback: Callable[[], Awaitable[Any]]) -> None:
        """Runs ``callback`` on the way out, before the stop callbacks registered earlier."""
        self._stack.push_async_callback(callback)

    def watch(self, failure: Awaitable[BaseException]) -> None:
        """``failure`` completes with the error of a part that cannot go on: the process then stops too."""
        self._failures.append(asyncio.ensure_future(failure))

    async def run_until_stopped(self) -> BaseException | None:
        """Waits for a stop signal, or for a watched part to fail; returns that part's error, if any."""
        stopped = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({stopped, *self._failures}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        for failure in self._failures:
            if failure.done() and not failure.cancelled() and failure.exception() is None:
                result = failure.result()
                if isinstance(result, BaseException):
                    return result
        return None

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        for failure in self._failures:
            failure.cancel()
        try:
            await self._stack.__aexit__(exc_type, exc, traceback)
        finally:
            assert self._loop is not None
            for signum in STOP_SIGNALS:
                self._loop.remove_signal_handler(signum)
