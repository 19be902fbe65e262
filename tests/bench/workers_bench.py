"""Worker drain rates against a bare acking consumer, and the whole pipeline end to end, on the real broker.

Run: ``make bench-workers`` (= ``.venv/bin/python -m tests.bench.workers_bench``), options after ``BENCH_ARGS=``,
e.g. ``BENCH_ARGS="--messages 10000 --only postgresql,merchant-events"``.

Everything runs in a namespace of its own (deleted afterwards) and a PostgreSQL database created for the run
(dropped afterwards). The merchant endpoint is the sandbox one (it verifies every Standard Webhooks
signature), served by a separate process so it does not share the worker's CPU.

Drains (phases ``bare``, ``sqlite``, ``postgresql``, ``merchant-events``): N messages are pre-loaded into one
consumer's queue, then ONE worker consumes them **in this process** (``Workers`` with the real
consumer, JSON logs rendered to /dev/null as in production) and the time from "consumers ready" to
"N messages processed" gives messages/s.

* ``bare``: a bare aio-pika consumer that only acks: same broker, queue type, queue and prefetch (the ceiling).
* ``sqlite`` / ``postgresql``: token-created (Alipay+ TOKEN_CREATED, every token new, so every message
  inserts an authorization and publishes ``authorization.activated`` with confirms).
* ``merchant-events``: ``authorization.activated`` events POSTed, signed, to the merchant endpoint.
* ``e2e``: ``authnotify ingress`` and ``authnotify worker token-created merchant-events`` as subprocesses
  (PostgreSQL), driven closed-loop at ``--concurrency`` with signed TOKEN_CREATED notifications (AMS and
  Alipay+ alternately); notifications/s from the first send to the last delivery at the merchant. This is the
  THROUGHPUT figure: the client sends faster than one worker drains, so its latency is mostly time spent
  queued behind the backlog, not a notification's time through the pipeline. ``--only e2e`` also runs:
* ``e2e-open``: the same subprocesses (started once for both phases), driven open-loop: signed TOKEN_CREATED
  notifications at a fixed ``--e2e-rate`` (default: half the closed-loop end-to-end throughput of this run, or
  100/s without it) whatever the answers do, for ``--e2e-open-messages`` (default ``--e2e-open-seconds``
  worth). This is the LATENCY figure: merchant received - scheduled send time, per notification (matched by
  accessTokenFingerprint), so a late send still counts. A few notifications go through first, unmeasured, so
  a fresh pipeline is warm.

CPU is reported per message for each process: the in-process worker (``time.process_time``) for the drains;
the ingress, worker, merchant and client processes (``/proc/<pid>/stat``) for the end-to-end phases. The last
line is a one-line summary of the run. ``--profile DIR`` samples the worker with py-spy during each worker
drain (``DIR/<phase>.svg``; ``--profile-raw``: collapsed stacks) - the flame graphs in ``docs/profiles/``.

Goals: token-created (PostgreSQL) >= 2,000 messages/s at <= 3 x the bare consumer's CPU per message;
merchant-events >= 3,000 messages/s. The machine is shared: compare ratios within one run, not absolute figures
across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import rsa

from authnotify.config import Settings
from authnotify.config.keys import private_key_pem, public_key_pem
from authnotify.domain.authorizations import AuthorizationData, access_token_fingerprint
from authnotify.domain.events import MerchantEvent
from authnotify.domain.merchants import generate_secret
from authnotify.messaging import headers as h
from authnotify.messaging.topology import (
    Consumer,
    Topology,
    build_topology,
    declare_topology,
    delete_topology,
    event_routing_key,
    notification_routing_key,
)
from authnotify.observability.metrics import MESSAGES_PROCESSED

PHASES = ("bare", "sqlite", "postgresql", "merchant-events", "e2e", "e2e-open")
IMPLIED = {"e2e": ("e2e-open",)}  # --only e2e runs both end-to-end phases
OPEN_LOOP_DEFAULT_RATE = 100.0  # notifications/s when there is no closed-loop throughput to halve
OPEN_LOOP_WARMUP = 50  # notifications through the pipeline before the open loop's clock starts
AMS_PATH, APS_PATH = "/ams/notifyAuthorization", "/aps/api/v1/authorizations/authNotify"
AMS_CLIENT_ID, APS_CLIENT_ID = "SANDBOX_BENCH_AMS", "2188120000000000"
PRELOAD_WINDOW = 500  # unconfirmed publishes in flight while pre-loading
# Issue 11's goals for the drains: messages/s, and the token-created CPU per message against the bare consumer's.
GOAL_RATES = {"postgresql": 2000.0, "merchant-events": 3000.0}
GOAL_CPU_RATIO = 3.0


# --- the merchant endpoint, in a process of its own ----------------------------------------------


async def serve_merchant(secret: str) -> None:
    """Child process: the sandbox endpoint; prints ``PORT n`` once, then ``<fingerprint> <monotonic>`` for each
    verified delivery it accepted (lines flushed every few ms: the time is taken on arrival)."""
    from aiohttp import web

    from authnotify.devtools.sandbox.merchant_endpoint import MerchantEndpoint

    endpoint = MerchantEndpoint(secret=secret)
    pending: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        response = await endpoint.handle(request)
        received = time.monotonic()
        done = endpoint.requests.pop()  # the record is ours to report; keeps memory flat
        if done.verified and 200 <= done.status < 300:
            pending.append(f"{done.event['data']['accessTokenFingerprint']} {received:.6f}\n")
        else:
            pending.append(f"! {done.status}\n")
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    while True:
        await asyncio.sleep(0.005)
        if pending:
            sys.stdout.write("".join(pending))
            sys.stdout.flush()
            pending.clear()


@dataclass
class MerchantProcess:
    process: asyncio.subprocess.Process
    port: int
    received: dict[str, float] = field(default_factory=dict)  # fingerprint -> monotonic arrival
    refused: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, secret: str) -> MerchantProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.bench.workers_bench", "--serve-merchant", secret,
            stdout=asyncio.subprocess.PIPE, limit=1 << 20,
        )
        assert process.stdout is not None
        first = await asyncio.wait_for(process.stdout.readline(), 30)
        if not first.startswith(b"PORT "):
            raise SystemExit("the merchant endpoint process did not start")
        merchant = cls(process, int(first.split()[1]))
        merchant.reader = asyncio.create_task(merchant._read())
        return merchant

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            fingerprint, _, value = line.decode().partition(" ")
            if fingerprint == "!":
                self.refused += 1
            else:
                self.received[fingerprint] = float(value)
            self.changed.set()

    def reset(self) -> None:
        self.received.clear()
        self.refused = 0

    async def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"merchant received {len(self.received)} of {count} events")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await _terminate(self.process)


async def _terminate(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()


# --- messages ----------------------------------------------------------------------------------------


def aps_token_created(access_token: str) -> bytes:
    """Alipay+'s documented TOKEN_CREATED sample: two tokens to encrypt, expiries, scopes, the customer."""
    return orjson.dumps({
        "authorizationNotifyType": "TOKEN_CREATED",
        "authClientId": "218823863726123456789",
        "referenceMerchantId": "218823863726123456780",
        "referenceAgreementId": f"agr-{access_token[-12:]}",
        "accessToken": access_token,
        "accessTokenExpiryTime": "2027-06-06T12:12:12+08:00",
        "refreshToken": f"refresh-{access_token}",
        "refreshTokenExpiryTime": "2027-06-08T12:12:12+08:00",
        "scopes": ["AGREEMENT_PAY", "USER_LOGIN_ID"],
        "customerId": "278980891234567891234567891",
        "userLoginId": "62-34312736",
        "acquirerId": "1021234567891230001",
        "pspId": "1021234567891230002",
        "walletForAccountBinding": {
            "walletName": "AlipayCN", "walletBrandName": "AlipayCN",
            "walletLogo": {"logoName": "AlipayCN", "logoUrl": "https://www.alipayplus.com/logo/2002.png"},
        },
    })


def ams_token_created(access_token: str) -> bytes:
    return orjson.dumps({
        "authorizationNotifyType": "TOKEN_CREATED",
        "authClientId": AMS_CLIENT_ID,
        "accessToken": access_token,
        "authState": "663A8FA9-D836-48EE-8AA1-1FF682989DC7",
        "userLoginId": "alice***@example.com",
        "userId": "2088102000000001",
        "result": {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"},
    })


def new_token() -> str:
    return f"AT-bench-{uuid.uuid4().hex}"


def notification_message(body: bytes, provider: str = "aps") -> aio_pika.Message:
    """What the ingress publishes for one notification."""
    return aio_pika.Message(
        body, message_id=uuid.uuid4().hex, content_type=h.JSON_CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={h.PROVIDER: provider, h.NOTIFY_TYPE: "TOKEN_CREATED", h.RECEIVED_AT: h.utc_now_iso(), h.ATTEMPT: 1},
    )


def activated_event_message(now: datetime) -> aio_pika.Message:
    """What the token-created worker publishes for a new Alipay+ authorization."""
    from authnotify.messaging.messages import event_message

    data = AuthorizationData(
        provider="aps", status="active", accessTokenFingerprint=access_token_fingerprint(new_token()),
        authClientId="218823863726123456789", referenceMerchantId="218823863726123456780",
        referenceAgreementId=f"agr-{uuid.uuid4().hex[:12]}", customerId="278980891234567891234567891",
        userLoginId="62-34312736", scopes=["AGREEMENT_PAY", "USER_LOGIN_ID"],
        accessTokenExpiryTime="2027-06-06T04:12:12Z", refreshTokenExpiryTime="2027-06-08T04:12:12Z",
    )
    event = event_message(MerchantEvent.of("authorization.activated", data, now))
    return aio_pika.Message(event.body, headers=event.headers, message_id=event.message_id,
                            content_type=event.properties.content_type, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def preload(url: str, topology: Topology, consumer: Consumer, count: int) -> None:
    """Publishes ``count`` messages (confirmed) that route to ``consumer``'s queue, which starts empty."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(topology.consumer_queue(consumer), passive=True)
        await queue.purge()
        exchange = await channel.get_exchange(topology.notifications_exchange, ensure=False)
        now = datetime.now(UTC)
        make: Callable[[], tuple[aio_pika.Message, str]]
        if consumer is Consumer.MERCHANT_EVENTS:
            make = lambda: (activated_event_message(now), event_routing_key("authorization.activated"))  # noqa: E731
        else:
            make = lambda: (notification_message(aps_token_created(new_token())),  # noqa: E731
                            notification_routing_key("aps", "TOKEN_CREATED"))
        for start in range(0, count, PRELOAD_WINDOW):
            batch = [make() for _ in range(min(PRELOAD_WINDOW, count - start))]
            await asyncio.gather(*(exchange.publish(m, key, mandatory=True) for m, key in batch))
        for _ in range(100):  # quorum queue counts settle just after the confirms
            declared = await channel.declare_queue(topology.consumer_queue(consumer), passive=True)
            if declared.declaration_result.message_count >= count:
                return
            await asyncio.sleep(0.05)
        raise SystemExit(f"pre-load: {declared.declaration_result.message_count} of {count} messages queued")


# --- drains ------------------------------------------------------------------------------------------


@dataclass
class Drain:
    name: str
    how: str
    messages: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_message(self) -> float:
        """Seconds of this process's CPU per message."""
        return self.cpu_seconds / self.messages if self.messages else float("nan")


def _processed(consumer: Consumer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for metric in MESSAGES_PROCESSED.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("queue") == consumer.value:
                counts[sample.labels["outcome"]] = int(sample.value)
    return counts


class Profiler:
    """py-spy sampling this process while a drain runs (``--profile``): a flame graph per phase."""

    def __init__(self, directory: Path | None, *, raw: bool = False) -> None:
        self.directory = directory
        self.raw = raw  # collapsed stacks (<phase>.txt) instead of an SVG
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, name: str) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        py_spy = Path(sys.executable).with_name("py-spy")
        output = self.directory / f"{name}.{'txt' if self.raw else 'svg'}"
        self._process = await asyncio.create_subprocess_exec(
            str(py_spy), "record", "--nonblocking", "--rate", "250", "--pid", str(os.getpid()),
            "--format", "raw" if self.raw else "flamegraph", "-o", str(output), stdout=asyncio.subprocess.DEVNULL)
        await asyncio.sleep(1.0)  # py-spy attaches

    async def stop(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGINT)  # py-spy writes the flame graph on SIGINT
            await self._process.wait()
            self._process = None


PROFILER = Profiler(None)


async def drain_worker(settings: Settings, consumer: Consumer, count: int, name: str, timeout: float) -> Drain:
    """One in-process Workers with the consumer's real handler, until ``count`` are processed."""
    from authnotify.workers.process import Workers
    from authnotify.workers.registry import build_specs
    from authnotify.workers.resources import Resources

    resources = Resources(settings)
    result = Drain(name, "in-process Workers")
    try:
        specs = await build_specs(resources, [consumer.value])  # opens the store, migrates: before the clock
        runtime = Workers(settings, specs, http_port=0)
        counted = _processed(consumer)
        before = sum(counted.values())
        await runtime.start()
        try:
            await runtime.wait_ready(30)
            await PROFILER.start(name.replace(" ", "-").replace("(", "").replace(")", ""))
            started, cpu_started = time.perf_counter(), time.process_time()
            at_start = sum(_processed(consumer).values()) - before
            deadline = started + timeout
            while sum(_processed(consumer).values()) - before < count:
                if time.perf_counter() > deadline:
                    raise SystemExit(f"{name}: {sum(_processed(consumer).values()) - before} of {count} "
                                     f"processed within {timeout:g} s")
                await asyncio.sleep(0.005)
            result.seconds = time.perf_counter() - started
            result.cpu_seconds = time.process_time() - cpu_started
            result.messages = count - at_start
            await PROFILER.stop()
        finally:
            await runtime.stop()
        after = _processed(consumer)
        result.outcomes = {k: v - counted.get(k, 0) for k, v in after.items() if v - counted.get(k, 0)}
        if set(result.outcomes) != {"ok"}:
            print(f"  WARNING {name}: not every message succeeded: {result.outcomes}", flush=True)
    finally:
        await resources.aclose()
    return result


async def drain_bare(url: str, topology: Topology, consumer: Consumer, count: int, prefetch: int,
                     timeout: float) -> Drain:
    """The ceiling: consume and ack, nothing else, same queue and prefetch."""
    result = Drain("bare aio-pika consumer", f"acks only, prefetch {prefetch}")
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(topology.consumer_queue(consumer), passive=True)
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            await message.ack()
            seen += 1
            if seen >= count:
                done.set()

        started, cpu_started = time.perf_counter(), time.process_time()
        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout)
        result.seconds = time.perf_counter() - started
        result.cpu_seconds = time.process_time() - cpu_started
        result.messages = seen
        await queue.cancel(tag)
    return result


# --- end to end --------------------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far, from /proc (Linux), including its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After "(comm)": state is field 3; utime, stime, cutime, cstime are fields 14-17 of the whole line.
    return sum(int(value) for value in fields[11:15]) / _CLOCK_TICKS


@dataclass
class CpuMeter:
    """CPU seconds each process of the end-to-end pipeline used between :meth:`start` and :meth:`stop`."""

    pids: dict[str, int]
    used: dict[str, float] = field(default_factory=dict)
    _started: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self._started = {name: self._read(name) for name in self.pids}

    def stop(self) -> None:
        self.used = {name: self._read(name) - self._started[name] for name in self.pids}

    def _read(self, name: str) -> float:
        if name == "client":
            return time.process_time()
        return process_cpu_seconds(self.pids[name])

    def per_message_ms(self, messages: int) -> str:
        return "  ".join(f"{name} {seconds * 1000 / messages:.3f}" for name, seconds in self.used.items()) \
            if messages else "-"


@dataclass
class EndToEnd:
    sent: int = 0
    acknowledged: int = 0
    delivered: int = 0
    seconds: float = 0.0
    ingress_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: CpuMeter | None = None

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return _percentile(self.latencies, q)


def _percentile(values: list[float], q: float) -> float:
    """Milliseconds; q=1.0 is the maximum."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


@dataclass
class Pipeline:
    """``authnotify ingress`` and ``authnotify worker token-created merchant-events``, as in production."""

    port: int
    alipay_key: rsa.RSAPrivateKey
    ingress: asyncio.subprocess.Process
    worker: asyncio.subprocess.Process

    @classmethod
    async def start(cls, env: dict[str, str]) -> Pipeline:
        from tests.bench.ingress_bench import free_port, wait_ready

        alipay_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        our_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        port = free_port()
        env = {**env,
               "AUTHNOTIFY_HTTP_HOST": "127.0.0.1", "AUTHNOTIFY_HTTP_PORT": str(port),
               "AUTHNOTIFY_AMS_CLIENT_ID": AMS_CLIENT_ID, "AUTHNOTIFY_APS_CLIENT_ID": APS_CLIENT_ID,
               "AUTHNOTIFY_AMS_PRIVATE_KEY": private_key_pem(our_key),
               "AUTHNOTIFY_APS_PRIVATE_KEY": private_key_pem(our_key),
               "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": public_key_pem(alipay_key.public_key()),
               "AUTHNOTIFY_APS_ALIPAY_PUBLIC_KEY": public_key_pem(alipay_key.public_key()),
               "AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO": "ALIPAY_CN"}
        quiet = {"stdout": asyncio.subprocess.DEVNULL, "stderr": asyncio.subprocess.DEVNULL}
        ingress = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authnotify", "ingress", env=env, **quiet)
        worker_env = {**env, "AUTHNOTIFY_WORKER_HTTP_PORT": str(free_port())}
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authnotify", "worker", "token-created", "merchant-events",
            env=worker_env, **quiet)
        pipeline = cls(port, alipay_key, ingress, worker)
        try:
            await wait_ready(port, ingress)
            await wait_ready(int(worker_env["AUTHNOTIFY_WORKER_HTTP_PORT"]), worker)
        except BaseException:
            await pipeline.stop()
            raise
        return pipeline

    def cpu_meter(self, merchant: MerchantProcess) -> CpuMeter:
        return CpuMeter({"ingress": self.ingress.pid, "worker": self.worker.pid,
                         "merchant": merchant.process.pid, "client": 0})

    def notifications(self, count: int) -> tuple[list[bytes], list[str]]:
        """``count`` signed TOKEN_CREATED requests (AMS and Alipay+ alternately), and their fingerprints."""
        from tests.bench.ingress_bench import signed_requests

        tokens = [new_token() for _ in range(count)]
        # signed_requests alternates AMS (even) and Alipay+ (odd) paths: bodies follow the same order.
        bodies = [ams_token_created(t) if i % 2 == 0 else aps_token_created(t) for i, t in enumerate(tokens)]
        return signed_requests(self.alipay_key, self.port, bodies), [access_token_fingerprint(t) for t in tokens]

    async def stop(self) -> None:
        await _terminate(self.ingress)
        await _terminate(self.worker)


async def closed_loop_e2e(args: argparse.Namespace, pipeline: Pipeline, merchant: MerchantProcess) -> EndToEnd:
    from tests.bench.ingress_bench import connect

    print(f"  closed loop: signing {args.e2e_messages} notifications before the clock starts ...", flush=True)
    requests, fingerprints = pipeline.notifications(args.e2e_messages)
    result = EndToEnd()
    merchant.reset()
    connections = [await connect(pipeline.port) for _ in range(args.concurrency)]
    sent_at: dict[str, float] = {}
    statuses: dict[int, int] = {}

    async def drive(offset: int) -> None:
        connection = connections[offset]
        for index in range(offset, len(requests), args.concurrency):
            sent_at[fingerprints[index]] = time.monotonic()
            status = await connection.request(requests[index])
            statuses[status] = statuses.get(status, 0) + 1

    result.cpu = pipeline.cpu_meter(merchant)
    result.cpu.start()
    started = time.monotonic()
    await asyncio.gather(*(drive(i) for i in range(args.concurrency)))
    result.ingress_seconds = time.monotonic() - started
    result.sent = len(requests)
    result.acknowledged = statuses.get(200, 0)
    if result.acknowledged != result.sent:
        print(f"  ingress answers: {statuses}", flush=True)
    await merchant.wait_for(result.acknowledged, args.timeout)
    result.cpu.stop()
    for connection in connections:
        assert connection.transport is not None
        connection.transport.close()
    received = {fp: at for fp, at in merchant.received.items() if fp in sent_at}
    result.delivered = len(received)
    result.seconds = max(received.values()) - started
    result.latencies = [at - sent_at[fp] for fp, at in received.items()]
    return result


@dataclass
class OpenLoop:
    target_rate: float
    sent: int = 0
    answers: dict[int, int] = field(default_factory=dict)
    delivered: int = 0
    send_seconds: float = 0.0  # first request written -> last request written
    seconds: float = 0.0  # first scheduled send -> last delivery at the merchant
    max_send_lag: float = 0.0  # how far behind its schedule the client ever wrote a request
    connections: int = 0
    latencies: list[float] = field(default_factory=list)  # merchant received - scheduled send
    ack_latencies: list[float] = field(default_factory=list)  # ingress answered - scheduled send
    cpu: CpuMeter | None = None

    @property
    def acknowledged(self) -> int:
        return self.answers.get(200, 0)

    @property
    def send_rate(self) -> float:
        return (self.sent - 1) / self.send_seconds if self.send_seconds and self.sent > 1 else 0.0

    def percentile(self, q: float) -> float:
        return _percentile(self.latencies, q)


async def open_loop_e2e(args: argparse.Namespace, pipeline: Pipeline, merchant: MerchantProcess, rate: float,
                        count: int) -> OpenLoop:
    """Writes request i at start + i/rate whatever the answers do (a new keep-alive connection when every open
    one awaits its answer); latency counts from that scheduled time, so the client's lateness is included."""
    from tests.bench.ingress_bench import PacedConnection, connect

    print(f"  open loop: signing {OPEN_LOOP_WARMUP} + {count} notifications before the clock starts ...",
          flush=True)
    requests, fingerprints = pipeline.notifications(OPEN_LOOP_WARMUP + count)

    # Warm-up, unmeasured: a pipeline started for this phase alone pays its first connections and queries here.
    merchant.reset()
    warm = [await connect(pipeline.port) for _ in range(4)]

    async def warm_up(offset: int) -> None:
        for index in range(offset, OPEN_LOOP_WARMUP, len(warm)):
            await warm[offset].request(requests[index])

    await asyncio.gather(*(warm_up(i) for i in range(len(warm))))
    for connection in warm:
        assert connection.transport is not None
        connection.transport.close()
    await merchant.wait_for(OPEN_LOOP_WARMUP, args.timeout)
    requests, fingerprints = requests[OPEN_LOOP_WARMUP:], fingerprints[OPEN_LOOP_WARMUP:]
    merchant.reset()

    loop = asyncio.get_running_loop()
    result = OpenLoop(target_rate=rate)
    idle: list[PacedConnection] = []
    opened: list[PacedConnection] = []
    finished: asyncio.Future[None] = loop.create_future()
    now = time.monotonic  # the merchant process stamps arrivals with the same (system-wide) clock

    def on_answer(connection: PacedConnection, status: int) -> None:
        result.ack_latencies.append(now() - connection.scheduled)
        result.answers[status] = result.answers.get(status, 0) + 1
        idle.append(connection)
        if len(result.ack_latencies) == count and not finished.done():
            finished.set_result(None)

    async def open_connection() -> PacedConnection:
        _, protocol = await loop.create_connection(lambda: PacedConnection(on_answer), "127.0.0.1", pipeline.port)
        opened.append(protocol)
        return protocol

    idle.extend([await open_connection() for _ in range(min(32, count))])
    sent_at: dict[str, float] = {}
    result.cpu = pipeline.cpu_meter(merchant)
    result.cpu.start()
    started = now()
    first_write = last_write = started
    index = 0
    while index < count:
        current = now()
        while index < count and started + index / rate <= current:
            connection = idle.pop() if idle else await open_connection()
            scheduled = started + index / rate
            connection.scheduled = scheduled
            sent_at[fingerprints[index]] = scheduled
            assert connection.transport is not None
            connection.transport.write(requests[index])
            last_write = now()
            if index == 0:
                first_write = last_write
            result.max_send_lag = max(result.max_send_lag, last_write - scheduled)
            index += 1
        if index < count:
            await asyncio.sleep(max(0.0, started + index / rate - now()))
    result.sent = count
    result.send_seconds = last_write - first_write
    result.connections = len(opened)
    await asyncio.wait_for(finished, args.timeout)
    if result.acknowledged != result.sent:
        print(f"  ingress answers: {result.answers}", flush=True)
    await merchant.wait_for(result.acknowledged, args.timeout)
    result.cpu.stop()
    for connection in opened:
        if connection.transport is not None:
            connection.transport.close()
    received = {fp: at for fp, at in merchant.received.items() if fp in sent_at}
    result.delivered = len(received)
    result.seconds = max(received.values()) - started if received else 0.0
    result.latencies = [at - sent_at[fp] for fp, at in received.items()]
    return result


# --- the run -----------------------------------------------------------------------------------------


async def create_database(server_url: str, name: str) -> str:
    import asyncpg
    from sqlalchemy.engine import make_url

    server = make_url(server_url)
    admin = await asyncpg.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return server.set(database=name).render_as_string(hide_password=False)


async def drop_database(server_url: str, name: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    server = make_url(server_url)
    admin = await asyncpg.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def quiet_logs() -> None:
    """JSON log lines rendered as in production, written to /dev/null instead of a pipe."""
    import structlog

    from authnotify.observability.logging import configure_logging

    configure_logging("json")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=open(os.devnull, "w")))  # noqa: SIM115


def print_table(drains: dict[str, Drain], e2e: EndToEnd | None, e2e_open: OpenLoop | None,
                args: argparse.Namespace) -> None:
    bare = drains.get("bare")
    if drains:
        print()
        print(f"{'phase':34} {'how':32} {'msgs':>6} {'msg/s':>8} {'x bare':>7} {'CPU ms/msg':>10} "
              f"{'x bare':>7}  outcomes")
    for key, drain in drains.items():
        ratio = f"{drain.rate / bare.rate:7.2f}" if bare and bare.rate and key != "bare" else f"{'':>7}"
        cpu_ratio = (f"{drain.cpu_per_message / bare.cpu_per_message:7.2f}"
                     if bare and bare.cpu_seconds and key != "bare" else f"{'':>7}")
        outcomes = ",".join(f"{k}={v}" for k, v in sorted(drain.outcomes.items())) or "-"
        print(f"{drain.name:34} {drain.how:32} {drain.messages:6d} {drain.rate:8.0f} {ratio} "
              f"{drain.cpu_per_message * 1000:10.3f} {cpu_ratio}  {outcomes}")
    if e2e is not None or e2e_open is not None:
        print()
        print("end to end (ingress -> worker token-created+merchant-events -> merchant, subprocesses, PostgreSQL):")
    if e2e is not None:
        print(f"  closed loop, concurrency {args.concurrency}: THROUGHPUT")
        print(f"    {e2e.delivered} of {e2e.sent} notifications delivered ({e2e.acknowledged} acknowledged by the "
              f"ingress at {e2e.acknowledged / e2e.ingress_seconds:.0f}/s)")
        print(f"    {e2e.rate:.0f} notifications/s end to end   (latency p50 {e2e.percentile(0.5):.1f} ms   "
              f"p99 {e2e.percentile(0.99):.1f} ms: time queued behind the backlog, not pipeline latency)")
        if e2e.cpu is not None:
            print(f"    CPU ms per notification: {e2e.cpu.per_message_ms(e2e.delivered)}")
    if e2e_open is not None:
        o = e2e_open
        print(f"  open loop at {o.target_rate:.0f}/s: LATENCY (merchant received - scheduled send)")
        print(f"    sent {o.sent} at {o.send_rate:.1f}/s (target {o.target_rate:.1f}/s, client at most "
              f"{o.max_send_lag * 1000:.1f} ms behind schedule, {o.connections} connections); "
              f"{o.acknowledged} acknowledged by the ingress (p50 {_percentile(o.ack_latencies, 0.5):.1f} ms, "
              f"p99 {_percentile(o.ack_latencies, 0.99):.1f} ms)")
        print(f"    {o.delivered} of {o.sent} delivered, "
              f"{o.delivered / o.seconds if o.seconds else 0:.1f}/s first send to last delivery")
        print(f"    latency p50 {o.percentile(0.5):.1f} ms   p99 {o.percentile(0.99):.1f} ms   "
              f"max {o.percentile(1.0):.1f} ms")
        if o.cpu is not None:
            print(f"    CPU ms per notification: {o.cpu.per_message_ms(o.delivered)}")
    print()
    for key, goal_rate in GOAL_RATES.items():
        drain = drains.get(key)
        if drain is None:
            continue
        verdicts = [f"{drain.rate:.0f}/s >= {goal_rate:.0f}/s: {'met' if drain.rate >= goal_rate else 'NOT met'}"]
        if key == "postgresql" and bare is not None and bare.cpu_seconds:
            cpu_ratio = drain.cpu_per_message / bare.cpu_per_message
            verdicts.append(f"CPU {cpu_ratio:.1f} <= {GOAL_CPU_RATIO:g} x bare: "
                            f"{'met' if cpu_ratio <= GOAL_CPU_RATIO else 'NOT met'}")
        print(f"goal {drain.name}: {'; '.join(verdicts)}")
    print_summary(drains, e2e, e2e_open)


def print_summary(drains: dict[str, Drain], e2e: EndToEnd | None, e2e_open: OpenLoop | None) -> None:
    """One line: each phase's rate, ratio to bare and CPU per message, to paste into a note."""
    bare = drains.get("bare")
    parts = []
    for key, drain in drains.items():
        part = f"{key} {drain.rate:.0f}/s"
        if bare and bare.rate and key != "bare":
            part += f" ({drain.rate / bare.rate:.2f}x bare, CPU {drain.cpu_per_message / bare.cpu_per_message:.1f}x)"
        parts.append(f"{part} {drain.cpu_per_message * 1000:.3f} ms")
    if e2e is not None:
        cpu = e2e.cpu.used if e2e.cpu else {}
        parts.append(f"e2e {e2e.rate:.0f}/s" + "".join(
            f" {name} {seconds * 1000 / e2e.delivered:.2f}ms" for name, seconds in cpu.items()
            if name in ("ingress", "worker") and e2e.delivered))
    if e2e_open is not None:
        parts.append(f"open-loop {e2e_open.target_rate:.0f}/s p50 {e2e_open.percentile(0.5):.1f} ms "
                     f"p99 {e2e_open.percentile(0.99):.1f} ms")
    print("summary: " + " | ".join(parts))


async def main(args: argparse.Namespace) -> int:
    asked = set(args.only) | {implied for phase in args.only for implied in IMPLIED.get(phase, ())}
    only = [phase for phase in PHASES if phase in asked]
    namespace = f"wbench{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    database_name = f"authnotify_bench_{uuid.uuid4().hex[:10]}"
    secret = generate_secret()
    print(f"authnotify workers benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC  cpus={os.cpu_count()}  "
          f"namespace={namespace}  queue={args.queue_type}  messages={args.messages}  phases={','.join(only)}",
          flush=True)
    quiet_logs()
    PROFILER.directory, PROFILER.raw = args.profile, args.profile_raw
    merchant = await MerchantProcess.start(secret)
    (workdir / "merchants.toml").write_text(
        f'[merchants.default]\nurl = "http://127.0.0.1:{merchant.port}/webhooks"\nsecret = "{secret}"\n')
    token_keys = Fernet.generate_key().decode()
    common: dict[str, Any] = {
        "rabbitmq_url": args.rabbitmq_url, "namespace": namespace, "queue_type": args.queue_type,
        "retry_delays": "1s", "worker_http_port": 0, "token_keys": token_keys,
        "merchants_file": str(workdir / "merchants.toml"),
    }
    postgres_url: str | None = None
    # The topology the workers build from these settings (per-consumer retry delays included).
    sqlite_settings = Settings(_env_file=None, database_url=f"sqlite+aiosqlite:///{workdir}/bench.db",
                               **common)  # type: ignore[call-arg]
    topology = build_topology(sqlite_settings)
    drains: dict[str, Drain] = {}
    e2e: EndToEnd | None = None
    e2e_open: OpenLoop | None = None
    pipeline: Pipeline | None = None  # started by the first end-to-end phase, shared by both
    try:
        if {"postgresql", "e2e", "e2e-open"} & set(only):
            postgres_url = await create_database(args.database_url, database_name)
        connection = await aio_pika.connect(args.rabbitmq_url)
        async with connection:
            await declare_topology(await connection.channel(), topology)
        prefetch = 64

        for phase in only:
            if phase == "bare":
                print("bare consumer: pre-loading ...", flush=True)
                await preload(args.rabbitmq_url, topology, Consumer.TOKEN_CREATED, args.messages)
                drains[phase] = await drain_bare(args.rabbitmq_url, topology, Consumer.TOKEN_CREATED,
                                                 args.messages, prefetch, args.timeout)
            elif phase in ("sqlite", "postgresql"):
                settings = sqlite_settings if phase == "sqlite" else Settings(
                    _env_file=None, database_url=postgres_url, **common)  # type: ignore[call-arg]
                print(f"token-created on {phase}: pre-loading ...", flush=True)
                await preload(args.rabbitmq_url, topology, Consumer.TOKEN_CREATED, args.messages)
                drains[phase] = await drain_worker(settings, Consumer.TOKEN_CREATED, args.messages,
                                                   f"token-created ({phase})", args.timeout)
            elif phase == "merchant-events":
                print("merchant-events: pre-loading ...", flush=True)
                await preload(args.rabbitmq_url, topology, Consumer.MERCHANT_EVENTS, args.messages)
                merchant.reset()
                drains[phase] = await drain_worker(sqlite_settings, Consumer.MERCHANT_EVENTS, args.messages,
                                                   "merchant-events", args.timeout)
                if len(merchant.received) < drains[phase].messages or merchant.refused:
                    print(f"  merchant saw {len(merchant.received)} verified deliveries, refused {merchant.refused}")
            elif phase in ("e2e", "e2e-open"):
                if pipeline is None:
                    print("end to end: starting ingress and worker subprocesses ...", flush=True)
                    env = {name: value for name, value in os.environ.items() if not name.startswith("AUTHNOTIFY_")}
                    env.update({
                        "AUTHNOTIFY_RABBITMQ_URL": args.rabbitmq_url, "AUTHNOTIFY_NAMESPACE": namespace,
                        "AUTHNOTIFY_QUEUE_TYPE": args.queue_type, "AUTHNOTIFY_RETRY_DELAYS": "1s",
                        "AUTHNOTIFY_DATABASE_URL": postgres_url or "", "AUTHNOTIFY_TOKEN_KEYS": token_keys,
                        "AUTHNOTIFY_MERCHANTS_FILE": str(workdir / "merchants.toml"),
                    })
                    pipeline = await Pipeline.start(env)
                if phase == "e2e":
                    print("end to end, closed loop (throughput) ...", flush=True)
                    e2e = await closed_loop_e2e(args, pipeline, merchant)
                    print(f"  {e2e.delivered} delivered in {e2e.seconds:.2f} s = {e2e.rate:.0f}/s", flush=True)
                else:
                    rate = args.e2e_rate or (e2e.rate / 2 if e2e is not None and e2e.rate else
                                             OPEN_LOOP_DEFAULT_RATE)
                    count = args.e2e_open_messages or max(1, round(rate * args.e2e_open_seconds))
                    print(f"end to end, open loop at {rate:.1f}/s for {count} notifications (latency) ...", flush=True)
                    e2e_open = await open_loop_e2e(args, pipeline, merchant, rate, count)
                    print(f"  {e2e_open.delivered} delivered, latency p50 {e2e_open.percentile(0.5):.1f} ms", flush=True)
            if phase in drains:
                drain = drains[phase]
                print(f"  {drain.name}: {drain.messages} in {drain.seconds:.2f} s = {drain.rate:.0f}/s", flush=True)
        print_table(drains, e2e, e2e_open, args)
    finally:
        if pipeline is not None:
            await pipeline.stop()
        await merchant.stop()
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(args.rabbitmq_url)
            async with connection:
                await declare_topology(await connection.channel(), topology)  # makes the delete below total
                await delete_topology(await connection.channel(), topology)
        if postgres_url is not None:
            await drop_database(args.database_url, database_name)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0: {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="workers_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="messages pre-loaded per drain")
    parser.add_argument("--only", type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
                        default=list(PHASES), help=f"comma-separated phases out of {','.join(PHASES)} "
                        "(e2e = both end-to-end phases: closed loop, then open loop; e2e-open = the open loop only)")
    parser.add_argument("--e2e-messages", type=int, default=5_000,
                        help="notifications sent end to end by the closed loop")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop end-to-end requests in flight")
    parser.add_argument("--e2e-rate", type=positive_float, default=None,
                        help="open-loop notifications/s (default: half the closed-loop end-to-end throughput of "
                             f"this run, or {OPEN_LOOP_DEFAULT_RATE:g}/s without it)")
    parser.add_argument("--e2e-open-messages", type=positive_int, default=None,
                        help="notifications the open loop sends (default: --e2e-open-seconds worth)")
    parser.add_argument("--e2e-open-seconds", type=positive_float, default=15.0,
                        help="open-loop duration when --e2e-open-messages is not given")
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per phase")
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "AUTHNOTIFY_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--database-url", default=os.environ.get(
        "AUTHNOTIFY_TEST_DATABASE_URL", "postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL server URL; the run creates (and drops) a database of its own there")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample the worker with py-spy during each worker drain: DIR/<phase>.svg "
                             "(the figures of a profiled run are not comparable)")
    parser.add_argument("--profile-raw", action="store_true", help="with --profile: collapsed stacks, DIR/<phase>.txt")
    parser.add_argument("--serve-merchant", metavar="SECRET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [phase for phase in args.only if phase not in PHASES]
    if unknown:
        parser.error(f"unknown phase {unknown[0]!r} (choose from {', '.join(PHASES)})")
    return args


if __name__ == "__main__":
    import uvloop

    arguments = parse_args()
    if arguments.serve_merchant:
        uvloop.run(serve_merchant(arguments.serve_merchant))
    else:
        sys.exit(uvloop.run(main(arguments)))
