"""``/healthz``, ``/readyz`` and ``/metrics``: the same answers for every process that serves them.

:func:`add_health_routes` puts ``/healthz`` and ``/readyz`` on an application a process already serves (the
ingress's Alipay-facing listener, which never serves ``/metrics``); :class:`HealthServer` serves routes on a
listener of their own: all three on the workers' ``AUTHNOTIFY_WORKER_HTTP_PORT``, ``/metrics`` alone on the
ingress's ``AUTHNOTIFY_METRICS_PORT``.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from authnotify.observability.logging import get_logger
from authnotify.observability.metrics import render_metrics

log = get_logger("authnotify.health")


def add_health_routes(app: web.Application, ready: Callable[[], bool], *, not_ready: str = "not ready") -> None:
    """``/healthz``: 200 while the process runs; ``/readyz``: 200 while ``ready()``, else 503."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        is_ready = ready()
        return web.json_response({"status": "ready" if is_ready else not_ready}, status=200 if is_ready else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


MetricsRenderer = Callable[[], tuple[bytes, str]]


def add_metrics_route(app: web.Application, render: MetricsRenderer = render_metrics) -> None:
    """``/metrics``: Prometheus text format, by default this process's metrics."""

    async def metrics(_request: web.Request) -> web.Response:
        body, content_type = render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app.router.add_get("/metrics", metrics)


class HealthServer:
    """``/metrics`` (and, given ``ready``, ``/healthz`` and ``/readyz``) on ``host:port`` of their own, until
    :meth:`stop`. Port 0 takes any free port (:attr:`port` says which). ``render`` gives the ``/metrics``
    answer (by default this process's metrics; the ingress's supervisor serves its children's)."""

    def __init__(self, host: str, port: int, ready: Callable[[], bool] | None, *, name: str = "health",
                 render: MetricsRenderer = render_metrics) -> None:
        self._host = host
        self._port = port
        self._ready = ready
        self._name = name
        self._render = render
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        if self._runner is not None and self._runner.addresses:
            return int(self._runner.addresses[0][1])
        return self._port

    async def start(self) -> None:
        app = web.Application()
        if self._ready is not None:
            add_health_routes(app, self._ready)
        add_metrics_route(app, self._render)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        log.info(f"{self._name}_server_started", port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
