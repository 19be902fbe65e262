"""``/healthz``, ``/readyz`` and ``/metrics``: the same three answers for every process that serves them.

:func:`add_health_routes` puts them on an application a process already serves (the ingress);
:class:`HealthServer` serves them on a listener of their own (the workers' ``AUTHNOTIFY_WORKER_HTTP_PORT``).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from authnotify.observability.logging import get_logger
from authnotify.observability.metrics import render_metrics

log = get_logger("authnotify.health")


def add_health_routes(app: web.Application, ready: Callable[[], bool], *, not_ready: str = "not ready") -> None:
    """``/healthz``: 200 while the process runs; ``/readyz``: 200 while ``ready()``, else 503; ``/metrics``."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        is_ready = ready()
        return web.json_response({"status": "ready" if is_ready else not_ready}, status=200 if is_ready else 503)

    async def metrics(_request: web.Request) -> web.Response:
        body, content_type = render_metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


class HealthServer:
    """The three routes on ``host:port`` of their own, until :meth:`stop`."""

    def __init__(self, host: str, port: int, ready: Callable[[], bool]) -> None:
        self._host = host
        self._port = port
        self._ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        add_health_routes(app, self._ready)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        log.info("health_server_started", port=self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
