"""The consumers of one process, put together: broker connection, publisher, runtime, health server.

``authnotify worker [NAME ...]`` runs :func:`run_workers`; ``authnotify dev`` and the tests use
:class:`Workers` directly.
"""

from __future__ import annotations

from collections.abc import Sequence

from authnotify.config import Settings, check_needs
from authnotify.errors import EXIT_OK, CommandError
from authnotify.messaging.connection import Broker
from authnotify.messaging.consumer import DRAIN_TIMEOUT_SECONDS, ConsumerRuntime, ConsumerSpec
from authnotify.messaging.health import HealthServer
from authnotify.messaging.lifecycle import Lifecycle
from authnotify.messaging.publisher import ConfirmedPublisher
from authnotify.messaging.topology import build_topology
from authnotify.observability.logging import get_logger
from authnotify.workers.registry import build_specs, needs_of
from authnotify.workers.resources import Resources

log = get_logger("authnotify.worker")

# Follow-ups (events, retries, dead letters) may wait this long for their confirm before the message is
# given back to the queue.
PUBLISH_TIMEOUT_SECONDS = 10.0


class Workers:
    """Consumers on one robust connection, their publisher, and (unless the port is 0) a health server."""

    def __init__(self, settings: Settings, specs: Sequence[ConsumerSpec], *, http_port: int | None = None,
                 broker: Broker | None = None, drain_timeout: float = DRAIN_TIMEOUT_SECONDS) -> None:
        names = ",".join(spec.consumer.value for spec in specs)
        self._own_broker = broker is None
        self.broker = broker or Broker(settings.broker_url(), build_topology(settings),
                                       connection_name=f"authnotify-worker:{names}")
        self.publisher = ConfirmedPublisher(self.broker, name="worker", confirm_timeout=PUBLISH_TIMEOUT_SECONDS)
        self.runtime = ConsumerRuntime(self.broker, self.publisher, specs, drain_timeout=drain_timeout)
        port = settings.worker_http_port if http_port is None else http_port
        self._health = HealthServer(settings.http_host, port, lambda: self.ready) if port else None

    @property
    def ready(self) -> bool:
        return self.runtime.ready and self.publisher.ready

    async def start(self) -> None:
        if self._health is not None:
            await self._health.start()
        self.publisher.start()
        self.runtime.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self.publisher.wait_ready(timeout)
        await self.runtime.wait_ready(timeout)

    async def wait_failed(self) -> BaseException:
        return await self.runtime.wait_failed()

    async def stop(self) -> None:
        """Drains the consumers (their follow-ups still publish), then closes the publisher and connection."""
        await self.runtime.stop()
        await self.publisher.close()
        if self._own_broker:
            await self.broker.close()
        if self._health is not None:
            await self._health.stop()
        log.info("worker_stopped")


async def run_workers(settings: Settings, names: Sequence[str]) -> int:
    """Until SIGTERM or SIGINT; a consumer that cannot start (a queue with other arguments) ends it."""
    check_needs(settings, needs_of(names))
    async with Lifecycle() as lifecycle:
        resources = Resources(settings)
        lifecycle.on_stop(resources.aclose)
        specs = await build_specs(resources, names)
        workers = Workers(settings, specs)
        await workers.start()
        lifecycle.on_stop(workers.stop)
        lifecycle.watch(workers.wait_failed())
        log.info("worker_started", consumers=[spec.consumer.value for spec in specs])
        failure = await lifecycle.run_until_stopped()
        log.info("worker_stopping")
    if failure is not None:
        detail = str(failure).splitlines()[0][:200] if str(failure) else ""
        raise CommandError(f"authnotify: worker could not start consuming ({type(failure).__name__}: {detail})")
    return EXIT_OK
