"""``authnotify ingress``: serve the notify paths until SIGTERM or SIGINT, then drain and exit 0.

On a stop signal the listener closes first, the requests in flight are answered (each publish is bounded
by its confirm timeout), and only then the broker channel and connection close. ``/metrics`` is served on
``AUTHNOTIFY_METRICS_PORT``, a listener of its own that Alipay's side never reaches.

With ``--processes N`` (N > 1) this runs in each of N children of :mod:`authnotify.ingress.supervisor`,
``supervised``: the port is shared (SO_REUSEPORT), metrics go to the supervisor's files rather than to a
listener of its own, every log line names the process, and the process drains when its supervisor goes away.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import sys

import structlog
from aiohttp import web

from authnotify.alipay.notifications import NOTIFY_PATHS, signed_path
from authnotify.config import Need, Settings, check_needs
from authnotify.errors import EXIT_OK, CommandError
from authnotify.ingress.app import INFLIGHT_KEY, create_app, record_gauges
from authnotify.messaging.health import HealthServer
from authnotify.messaging.lifecycle import Lifecycle, listen
from authnotify.observability.logging import get_logger

log = get_logger("authnotify.ingress")

# What the ingress reads of the configuration: no database, no token keys; of the merchant registry only the
# allow_unbinding flags (consultUnbinding), where one is configured.
INGRESS_NEEDS = frozenset({Need.BROKER, Need.ALIPAY_KEYS, Need.UNBINDING_FLAGS})

# In-flight publishes give up after their confirm timeout, so a drain never needs longer than this.
DRAIN_TIMEOUT_SECONDS = 10.0
LISTEN_BACKLOG = 4096
# An idle connection (also one that never finishes its headers) is closed after this; aiohttp's own default
# is an hour, which lets idle connections pile up.
KEEPALIVE_TIMEOUT_SECONDS = 75.0
# After answering a request whose body was not read (too big, too slow), aiohttp reads and discards the rest
# for this long before closing, so the client sees the answer; its default, 10 s, keeps slow clients around.
LINGERING_SECONDS = 1.0
# How stale a supervised process's gauges (publishes in flight, body bytes held, broker connected) may be.
GAUGE_INTERVAL_SECONDS = 1.0


def raise_open_file_limit() -> int:
    """Raises the soft limit on open files to the hard limit (each connection is one); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # not allowed here: keep what we have
            pass
    return soft


def ingress_runner(app: web.Application, *, handle_signals: bool = False) -> web.AppRunner:
    """The runner every ingress listener uses (the service, ``dev``, the tests): same timeouts everywhere."""
    return web.AppRunner(app, access_log=None, handle_signals=handle_signals, shutdown_timeout=DRAIN_TIMEOUT_SECONDS,
                         keepalive_timeout=KEEPALIVE_TIMEOUT_SECONDS, lingering_time=LINGERING_SECONDS)


async def _record_gauges_periodically(app: web.Application) -> None:
    while True:
        record_gauges(app)
        await asyncio.sleep(GAUGE_INTERVAL_SECONDS)


def _stop_when_supervisor_gone(lifecycle: Lifecycle) -> None:
    """The supervisor holds our stdin open and never writes to it: end of file means it is gone (killed),
    and a process nobody supervises drains and exits like on SIGTERM."""
    loop = asyncio.get_running_loop()
    stdin = sys.stdin.fileno()

    def readable() -> None:
        if not os.read(stdin, 4096):
            loop.remove_reader(stdin)
            log.warning("ingress_supervisor_gone")
            lifecycle.stop_requested.set()

    async def stop_reading() -> None:
        loop.remove_reader(stdin)

    loop.add_reader(stdin, readable)
    lifecycle.on_stop(stop_reading)


async def run_ingress(settings: Settings, *, supervised: bool = False) -> int:
    check_needs(settings, INGRESS_NEEDS)
    enabled = settings.configured_providers()
    open_files = raise_open_file_limit()
    if supervised:
        structlog.contextvars.bind_contextvars(pid=os.getpid())
    listener = listen(settings.http_host, settings.http_port, backlog=LISTEN_BACKLOG, reuse_port=supervised)
    app = create_app(settings)
    runner = ingress_runner(app)
    async with Lifecycle() as lifecycle:
        if supervised:
            _stop_when_supervisor_gone(lifecycle)
            gauges = asyncio.create_task(_record_gauges_periodically(app))

            async def stop_recording() -> None:
                gauges.cancel()
                record_gauges(app)

            lifecycle.on_stop(stop_recording)
        elif settings.metrics_port:
            metrics = HealthServer(settings.http_host, settings.metrics_port, None, name="metrics")
            try:
                await metrics.start()
            except OSError as exc:
                raise CommandError(f"authnotify: cannot listen on {settings.http_host}:{settings.metrics_port} "
                                   f"for /metrics ({exc.strerror or exc}): set AUTHNOTIFY_METRICS_PORT") from None
            lifecycle.on_stop(metrics.stop)
        await runner.setup()

        async def drain() -> None:
            log.info("ingress_draining", inflight=app[INFLIGHT_KEY].current)
            await runner.cleanup()

        lifecycle.on_stop(drain)
        await web.SockSite(runner, listener).start()
        # Everything allocated so far lives as long as the process: keep the collector from rescanning it.
        gc.collect()
        gc.freeze()
        log.info("ingress_listening", host=settings.http_host, port=settings.http_port, providers=enabled,
                 paths=[signed_path(NOTIFY_PATHS[name], settings.notify_path_prefix) for name in enabled],
                 metrics_port=None if supervised else settings.metrics_port or None,
                 open_files=open_files)
        await lifecycle.run_until_stopped()
    log.info("ingress_stopped")
    return EXIT_OK
