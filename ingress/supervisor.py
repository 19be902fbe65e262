"""``authnotify ingress --processes N`` (N > 1): N ingress processes sharing the port, one supervisor.

Each child is ``authnotify ingress`` itself, run supervised (:func:`authnotify.ingress.server.run_ingress`):
it binds the port with SO_REUSEPORT, so the kernel spreads new connections over the children, and opens its
own broker connection. The children write their metrics to files in a directory private to this supervisor
(prometheus_client's multiprocess mode); the supervisor serves them all, summed, on
``AUTHNOTIFY_METRICS_PORT``. ``/healthz`` and ``/readyz`` stay on the shared port: whichever child takes the
connection answers for itself.

A child that exits unasked is restarted after a pause that doubles from 1 s up to 30 s (back to 1 s once a
child has run a minute). When children have exited unasked ``CRASH_LIMIT`` times within ``CRASH_WINDOW``, the
supervisor stops the others and exits 1: something is wrong that restarts do not fix, and the orchestrator
should see it. On SIGTERM or SIGINT every child is sent SIGTERM and drains as a single ingress does; the
supervisor exits 0 once all have exited 0. A child whose supervisor is killed drains and exits on its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from authnotify.config import Settings, check_needs
from authnotify.errors import EXIT_OK, CommandError
from authnotify.ingress.server import DRAIN_TIMEOUT_SECONDS, INGRESS_NEEDS
from authnotify.messaging.health import HealthServer
from authnotify.messaging.lifecycle import Lifecycle, check_shared_port
from authnotify.observability.logging import get_logger

log = get_logger("authnotify.ingress.supervisor")

FIRST_RESTART_DELAY_SECONDS = 1.0
MAX_RESTART_DELAY_SECONDS = 30.0
HEALTHY_RUN_SECONDS = 60.0  # a child that ran this long before exiting resets the restart delay
CRASH_LIMIT = 5
CRASH_WINDOW_SECONDS = 60.0
# A child drains within its own drain timeout; past this margin it is killed.
STOP_TIMEOUT_SECONDS = DRAIN_TIMEOUT_SECONDS + 5.0
CHILD_COMMAND = (sys.executable, "-m", "authnotify", "ingress", "--supervised")


class CrashLoop(Exception):
    """Children keep exiting unasked."""


class Supervisor:
    """Keeps ``processes`` children running until :meth:`stop`; :meth:`crash_loop` says when it gives up."""

    def __init__(self, processes: int, metrics_dir: str) -> None:
        self._processes = processes
        self._metrics_dir = metrics_dir
        self._env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        self._children: dict[int, asyncio.subprocess.Process] = {}  # slot -> the process running in it
        self._keepers: list[asyncio.Task[None]] = []
        self._crashes: list[float] = []
        self._stopping = asyncio.Event()
        self._gave_up: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self.exit_codes: dict[int, int] = {}

    def start(self) -> None:
        self._keepers = [asyncio.create_task(self._keep_running(slot)) for slot in range(self._processes)]

    async def crash_loop(self) -> BaseException:
        return await self._gave_up

    async def _keep_running(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        delay = FIRST_RESTART_DELAY_SECONDS
        while not self._stopping.is_set():
            # Its own session: a terminal's Ctrl-C reaches the supervisor alone, which then stops the children.
            process = await asyncio.create_subprocess_exec(*CHILD_COMMAND, env=self._env,
                                                           stdin=asyncio.subprocess.PIPE, start_new_session=True)
            self._children[slot] = process
            started = loop.time()
            log.info("ingress_process_started", slot=slot, child_pid=process.pid)
            code = await process.wait()
            self._forget(process.pid)
            if self._stopping.is_set():
                self.exit_codes[slot] = code
                return
            now = loop.time()
            self._crashes = [at for at in self._crashes if now - at < CRASH_WINDOW_SECONDS] + [now]
            if now - started >= HEALTHY_RUN_SECONDS:
                delay = FIRST_RESTART_DELAY_SECONDS
            log.error("ingress_process_exited", slot=slot, child_pid=process.pid, exit_code=code,
                      restart_in_seconds=delay, recent_exits=len(self._crashes))
            if len(self._crashes) >= CRASH_LIMIT:
                if not self._gave_up.done():
                    self._gave_up.set_result(CrashLoop(
                        f"ingress processes exited {len(self._crashes)} times within {CRASH_WINDOW_SECONDS:g} s "
                        f"(last exit code {code})"))
                return
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, MAX_RESTART_DELAY_SECONDS)

    def _forget(self, pid: int) -> None:
        """A dead child's live gauges leave the scrape; its counters and histograms stay in the sums."""
        mark_process_dead(pid, self._metrics_dir)
        # Gauges in the default mode ("all", one series per pid) are not removed by mark_process_dead.
        Path(self._metrics_dir, f"gauge_all_{pid}.db").unlink(missing_ok=True)

    async def stop(self) -> None:
        """SIGTERM to every child, then waits until all have drained (killing any past STOP_TIMEOUT_SECONDS)."""
        self._stopping.set()
        running = [process for process in self._children.values() if process.returncode is None]
        log.info("ingress_processes_draining", child_pids=[process.pid for process in running])
        for process in running:
            process.send_signal(signal.SIGTERM)
        done, pending = await asyncio.wait(self._keepers, timeout=STOP_TIMEOUT_SECONDS)
        for slot, process in self._children.items():
            if process.returncode is None:
                log.error("ingress_process_killed", slot=slot, child_pid=process.pid,
                          reason=f"not drained within {STOP_TIMEOUT_SECONDS:g} s")
                process.kill()
        if pending:
            await asyncio.wait(pending)


async def run_ingress_processes(settings: Settings, processes: int) -> int:
    check_needs(settings, INGRESS_NEEDS)
    check_shared_port(settings.http_host, settings.http_port)
    metrics_dir = tempfile.mkdtemp(prefix="authnotify-ingress-metrics-")
    try:
        async with Lifecycle() as lifecycle:
            if settings.metrics_port:
                metrics = HealthServer(settings.http_host, settings.metrics_port, None, name="metrics",
                                       render=lambda: _render_children_metrics(metrics_dir))
                try:
                    await metrics.start()
                except OSError as exc:
                    raise CommandError(
                        f"authnotify: cannot listen on {settings.http_host}:{settings.metrics_port} for /metrics "
                        f"({exc.strerror or exc}): set AUTHNOTIFY_METRICS_PORT") from None
                lifecycle.on_stop(metrics.stop)
            supervisor = Supervisor(processes, metrics_dir)
            supervisor.start()
            lifecycle.on_stop(supervisor.stop)
            lifecycle.watch(supervisor.crash_loop())
            log.info("ingress_supervising", processes=processes, port=settings.http_port,
                     metrics_port=settings.metrics_port or None)
            failure = await lifecycle.run_until_stopped()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if failure is not None:
        raise CommandError(f"authnotify: ingress stopped: {failure}")
    failed = {slot: code for slot, code in supervisor.exit_codes.items() if code != EXIT_OK}
    if failed:
        raise CommandError(f"authnotify: ingress processes did not drain cleanly (exit codes {sorted(failed.values())})")
    log.info("ingress_stopped")
    return EXIT_OK


def _render_children_metrics(metrics_dir: str) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    return generate_latest(registry), CONTENT_TYPE_LATEST
