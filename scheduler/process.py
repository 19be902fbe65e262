"""``authnotify scheduler``: every ``AUTHNOTIFY_SCHEDULER_INTERVAL``, publish the lifecycle work that is due.

A pass claims due authorizations in batches (PostgreSQL ``FOR UPDATE SKIP LOCKED`` with a lease column;
SQLite one atomic ``UPDATE ... RETURNING``), commits the claim, publishes with confirms, then records what
the broker confirmed and gives the claims back:

* a refresh request to ``{ns}.token-refresh`` for an active authorization whose access token expires within
  ``AUTHNOTIFY_REFRESH_BEFORE`` and whose refresh token is still valid, or whose access token has expired
  with nothing left to refresh it (the worker then expires it); none while an earlier one is pending (for
  the span of the token-refresh retries);
* ``authorization.expiring`` to the merchant, once per token, when the token that keeps the authorization
  alive expires within ``AUTHNOTIFY_EXPIRY_WARNING``.

A publish that fails is due again on the next pass (its claim is given back); a scheduler that dies holding
claims loses them after the lease. Several schedulers pass over each other's claims, so each piece of work
is published once (a duplicate, after a lease ran out, is harmless: the worker refreshes a token once and a
warning's webhook-id is the same). The database or the broker going away only skips passes; SIGTERM lets the
pass in progress finish (bounded), then the process exits 0. Each pass also sets the lifecycle gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from authnotify.config import Need, Settings, check_needs
from authnotify.domain.authorizations import STATUSES
from authnotify.domain.commands import RefreshRequest
from authnotify.domain.events import expiring_event
from authnotify.errors import EXIT_OK, PublishFailed, StoreError
from authnotify.messaging.connection import Broker
from authnotify.messaging.health import HealthServer
from authnotify.messaging.lifecycle import Lifecycle
from authnotify.messaging.publisher import ConfirmedPublisher, Publisher
from authnotify.messaging.sending import send_command, send_event
from authnotify.messaging.topology import Consumer, Topology, build_topology
from authnotify.observability.logging import get_logger
from authnotify.observability.metrics import (
    AUTHORIZATIONS,
    BROKER_CONNECTED,
    SCHEDULER_LAG_SECONDS,
    SCHEDULER_PASS_SECONDS,
    SCHEDULER_PUBLISHED,
    TOKENS_EXPIRING,
)
from authnotify.store import AuthorizationStore, open_store
from authnotify.store.repository import DueWork, DueWorkDone, Schedule

log = get_logger("authnotify.scheduler")

# What the scheduler reads of the configuration: it publishes commands and warnings and never reads a token,
# so no token keys, no Alipay keys, no merchant registry.
SCHEDULER_NEEDS = frozenset({Need.BROKER, Need.DATABASE})

BATCH_SIZE = 500  # authorizations claimed (and published at once) per round trip
LEASE_SECONDS = 120.0  # a claim outlives a stuck pass this long, then another scheduler may take the work
PENDING_MARGIN_SECONDS = 600.0  # on top of the token-refresh retries: time to handle the last attempt
PUBLISH_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 20.0


def schedule_of(settings: Settings, topology: Topology, *, lease_seconds: float = LEASE_SECONDS) -> Schedule:
    """When work is due. A refresh request stays pending as long as its retries can take."""
    retries = sum(step.delay_seconds for step in topology.retry_steps(Consumer.TOKEN_REFRESH))
    return Schedule(
        refresh_before=timedelta(seconds=settings.refresh_before),
        expiry_warning=timedelta(seconds=settings.expiry_warning),
        pending=timedelta(seconds=retries + PENDING_MARGIN_SECONDS),
        lease=timedelta(seconds=lease_seconds),
    )


@dataclass(frozen=True)
class PassResult:
    claimed: int
    refresh_requests: int
    warnings: int
    failed: int
    seconds: float
    lag_seconds: float


class Scheduler:
    """The passes, on a store and a publisher it is given (so tests and ``authnotify dev`` can share theirs)."""

    def __init__(self, store: AuthorizationStore, publisher: Publisher, topology: Topology, schedule: Schedule, *,
                 batch_size: int = BATCH_SIZE) -> None:
        self.store = store
        self.publisher = publisher
        self.topology = topology
        self.schedule = schedule
        self.batch_size = batch_size
        self.database_ok = True

    async def run_pass(self) -> PassResult:
        """Publishes everything due now (in batches); stops at the first batch the broker did not confirm all of."""
        started = time.perf_counter()
        claimed = refreshes = warnings = failed = 0
        try:
            while True:
                works = await self.store.claim_due_work(self.schedule, limit=self.batch_size)
                if not works:
                    break
                done = await asyncio.gather(*(self._publish(work) for work in works))
                await self.store.finish_due_work(list(done))
                claimed += len(works)
                refreshes += sum(item.refresh_published for item in done)
                warnings += sum(item.warning_published for item in done)
                batch_failed = sum((item.work.refresh and not item.refresh_published)
                                   + (item.work.warn_for is not None and not item.warning_published) for item in done)
                failed += batch_failed
                if batch_failed or len(works) < self.batch_size:
                    break  # broker trouble: the rest waits for the next pass
            lag = await self._update_gauges()
            self.database_ok = True
        except StoreError as exc:
            self.database_ok = False
            log.warning("scheduler_pass_failed", error=str(exc))
            lag = float("nan")
        seconds = time.perf_counter() - started
        SCHEDULER_PASS_SECONDS.observe(seconds)
        result = PassResult(claimed, refreshes, warnings, failed, seconds, lag)
        if claimed or failed:
            log.info("scheduler_pass", claimed=claimed, refresh_requests=refreshes, warnings=warnings, failed=failed,
                     seconds=round(seconds, 3))
        return result

    async def _publish(self, work: DueWork) -> DueWorkDone:
        data = work.authorization
        assert data.authorizationId is not None
        refreshed = warned = False
        if work.refresh:
            try:
                await send_command(self.publisher, self.topology, RefreshRequest(
                    authorizationId=data.authorizationId, provider=data.provider,
                    accessTokenFingerprint=data.accessTokenFingerprint))
                refreshed = True
            except PublishFailed as exc:
                log.warning("refresh_request_not_published", authorization_id=data.authorizationId, error=str(exc))
            SCHEDULER_PUBLISHED.labels(kind="refresh", outcome="published" if refreshed else "failed").inc()
        if work.warn_for is not None:
            try:
                await send_event(self.publisher, self.topology,
                                 expiring_event(data, expires_at=work.warn_for, warned_at=work.claimed_at))
                warned = True
            except PublishFailed as exc:
                log.warning("expiry_warning_not_published", authorization_id=data.authorizationId, error=str(exc))
            SCHEDULER_PUBLISHED.labels(kind="expiring", outcome="published" if warned else "failed").inc()
        return DueWorkDone(work, refreshed, warned)

    async def _update_gauges(self) -> float:
        stats = await self.store.lifecycle_stats(self.schedule)
        for status in STATUSES:
            AUTHORIZATIONS.labels(status=status).set(stats.by_status.get(status, 0))
        for (kind, within), count in stats.expiring.items():
            TOKENS_EXPIRING.labels(token=kind, within=within).set(count)
        lag = 0.0
        if stats.oldest_due is not None:
            lag = max(0.0, (datetime.now(UTC) - stats.oldest_due).total_seconds())
        SCHEDULER_LAG_SECONDS.set(lag)
        return lag


class SchedulerLoop:
    """A pass every ``interval`` seconds until :meth:`stop`; opens the store itself, retrying while it is away."""

    def __init__(self, settings: Settings, publisher: Publisher, topology: Topology, *,
                 store: AuthorizationStore | None = None, interval: float | None = None,
                 lease_seconds: float = LEASE_SECONDS) -> None:
        self.settings = settings
        self.publisher = publisher
        self.topology = topology
        self.interval = settings.scheduler_interval if interval is None else interval
        self.schedule = schedule_of(settings, topology, lease_seconds=lease_seconds)
        self._store = store
        self._owns_store = store is None
        self.scheduler: Scheduler | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.passes = 0

    @property
    def ready(self) -> bool:
        return self.publisher.ready and self.scheduler is not None and self.scheduler.database_ok

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def _open_store(self) -> AuthorizationStore | None:
        try:
            # No token keys: the scheduler never reads a token.
            return await open_store(self.settings.store_url(), None)
        except StoreError as exc:
            log.warning("scheduler_database_unreachable", error=str(exc))
            return None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            if self._store is None:
                self._store = await self._open_store()
            if self._store is not None:
                if self.scheduler is None:
                    self.scheduler = Scheduler(self._store, self.publisher, self.topology, self.schedule)
                if self.publisher.ready:
                    await self.scheduler.run_pass()
                    self.passes += 1
                else:
                    log.warning("scheduler_pass_skipped", reason="broker unavailable")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    async def stop(self) -> None:
        """Lets the pass in progress finish (bounded), then closes the store it opened."""
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                log.warning("scheduler_stop_timeout")  # claims left behind expire after the lease
        if self._store is not None and self._owns_store:
            await self._store.close()


async def run_scheduler(settings: Settings) -> int:
    check_needs(settings, SCHEDULER_NEEDS)
    topology = build_topology(settings)
    async with Lifecycle() as lifecycle:
        broker = Broker(settings.broker_url(), topology, connection_name="authnotify-scheduler")
        publisher = ConfirmedPublisher(broker, name="scheduler", confirm_timeout=PUBLISH_TIMEOUT_SECONDS)
        loop = SchedulerLoop(settings, publisher, topology)
        health = (HealthServer(settings.http_host, settings.worker_http_port, lambda: loop.ready)
                  if settings.worker_http_port else None)
        if health is not None:
            await health.start()
            lifecycle.on_stop(health.stop)
        publisher.start()
        BROKER_CONNECTED.set_function(lambda: 1.0 if publisher.ready else 0.0)
        lifecycle.on_stop(broker.close)
        lifecycle.on_stop(publisher.close)
        loop.start()
        lifecycle.on_stop(loop.stop)
        log.info("scheduler_started", interval_seconds=loop.interval, refresh_before_seconds=settings.refresh_before,
                 expiry_warning_seconds=settings.expiry_warning)
        await lifecycle.run_until_stopped()
        log.info("scheduler_stopping")
    log.info("scheduler_stopped")
    return EXIT_OK
