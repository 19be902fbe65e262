"""``authnotify ingress``: serve the notify paths until SIGTERM or SIGINT, then drain and exit 0.

On a stop signal the listener closes first, the requests in flight are answered (each publish is bounded
by its confirm timeout), and only then the broker channel and connection close.
"""

from __future__ import annotations

import gc

from aiohttp import web

from authnotify.alipay.notifications import NOTIFY_PATHS
from authnotify.config import PROVIDERS, Settings
from authnotify.errors import EXIT_OK, EXIT_USAGE, CommandError
from authnotify.ingress.app import INFLIGHT_KEY, create_app
from authnotify.messaging.lifecycle import Lifecycle, listen
from authnotify.observability.logging import get_logger

log = get_logger("authnotify.ingress")

# In-flight publishes give up after their confirm timeout, so a drain never needs longer than this.
DRAIN_TIMEOUT_SECONDS = 10.0
LISTEN_BACKLOG = 1024


async def run_ingress(settings: Settings) -> int:
    enabled = [name for name in PROVIDERS if settings.provider(name) is not None]
    if not enabled:
        raise CommandError(
            "authnotify: no provider configured: set AUTHNOTIFY_AMS_CLIENT_ID or AUTHNOTIFY_APS_CLIENT_ID",
            EXIT_USAGE,
        )
    listener = listen(settings.http_host, settings.http_port)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=DRAIN_TIMEOUT_SECONDS)
    async with Lifecycle() as lifecycle:
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
                 paths=[NOTIFY_PATHS[name] for name in enabled])
        await lifecycle.run_until_stopped()
    log.info("ingress_stopped")
    return EXIT_OK
