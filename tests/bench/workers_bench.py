"""Worker drain rates against a bare acking consumer, and the whole pipeline end to end, on the real broker.

Run: ``make bench-workers`` (= ``.venv/bin/python -m tests.bench.workers_bench``), options after ``BENCH_ARGS=``,
e.g. ``BENCH_ARGS="--messages 10000 --only postgresql,merchant-events"``.

Everything runs in a namespace of its own (deleted afterwards) and a PostgreSQL database created for the run
(dropped afterwards). The merchant endpoint is the sandbox one (it verifies every Standard Webhooks
signature), served by a separate process so it does not share the worker's CPU.

Drains (phases ``bare``, ``sqlite``, ``postgresql``, ``merchant-events``): N messages are pre-loaded into one
consumer's queue, then ONE worker consumes them **in this process** (``WorkerRuntime`` with the real
``worker_spec``, JSON logs rendered to /dev/null as in production) and the time from "consumers ready" to
"N messages processed" gives messages/s.

* ``bare``: a bare aio-pika consumer that only acks: same broker, queue type, queue and prefetch (the ceiling).
* ``sqlite`` / ``postgresql``: token-created (Alipay+ TOKEN_CREATED, every token new, so every message
  inserts an authorization and publishes ``authorization.activated`` with confirms).
* ``merchant-events``: ``authorization.activated`` events POSTed, signed, to the merchant endpoint.
* ``e2e``: ``authnotify ingress`` and ``authnotify worker token-created merchant-events`` as subprocesses
  (PostgreSQL), driven closed-loop at ``--concurrency`` with signed TOKEN_CREATED notifications (AMS and
  Alipay+ alternately); notifications/s from the first send to the last delivery at the merchant, and
  end-to-end latency = merchant received - request sent.

Goal: token-created (PostgreSQL) and merchant-events >= 1,000 messages/s with one process and >= 0.5 x the bare
consumer. The machine is shared: compare ratios within one run, not absolute figures across runs.
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

from shared import messages as h
from shared.config import Settings
from shared.events import AuthorizationData, MerchantEvent, access_token_fingerprint
from shared.keys import private_key_pem, public_key_pem
from shared.merchants import generate_secret
from shared.metrics import MESSAGES_PROCESSED
from shared.topology import (
    Consumer,
    QueueType,
    Topology,
    build_topology,
    declare_topology,
    delete_topology,
    event_routing_key,
    notification_routing_key,
)

PHASES = ("bare", "sqlite", "postgresql", "merchant-events", "e2e")
AMS_PATH, APS_PATH = "/ams/notifyAuthorization", "/aps/api/v1/authorizations/authNotify"
AMS_CLIENT_ID, APS_CLIENT_ID = "SANDBOX_BENCH_AMS", "2188120000000000"
PRELOAD_WINDOW = 500  # unconfirmed publishes in flight while pre-loading
GOAL_RATE, GOAL_RATIO = 1000.0, 0.5


# --- the merchant endpoint, in a process of its own ----------------------------------------------


async def serve_merchant(secret: str) -> None:
    """Child process: the sandbox endpoint; prints ``PORT n`` once, then ``<fingerprint> <monotonic>`` for each
    verified delivery it accepted (lines flushed every few ms: the time is taken on arrival)."""
    from aiohttp import web

    from authnotify.sandbox.merchant_endpoint import MerchantEndpoint

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
    """Seed 003's Alipay+ TOKEN_CREATED: two tokens to encrypt, expiries, scopes, the customer."""
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
    from workers.runtime import event_message

    data = AuthorizationData(
        provider="aps", status="active", accessTokenFingerprint=access_token_fingerprint(new_token()),
        authClientId="218823863726123456789", referenceMerchantId="218823863726123456780",
        referenceAgreementId=f"agr-{uuid.uuid4().hex[:12]}", customerId="278980891234567891234567891",
        userLoginId="62-34312736", scopes=["AGREEMENT_PAY", "USER_LOGIN_ID"],
        accessTokenExpiryTime="2027-06-06T04:12:12Z", refreshTokenExpiryTime="2027-06-08T04:12:12Z",
    )
    return event_message(MerchantEvent.of("authorization.activated", data, now))


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


def _processed(consumer: Consumer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for metric in MESSAGES_PROCESSED.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("queue") == consumer.value:
                counts[sample.labels["outcome"]] = int(sample.value)
    return counts


async def drain_worker(settings: Settings, consumer: Consumer, count: int, name: str, timeout: float) -> Drain:
    """One in-process WorkerRuntime with the consumer's real worker_spec, until ``count`` are processed."""
    from workers.main import build_specs
    from workers.resources import Resources
    from workers.runtime import WorkerRuntime

    resources = Resources(settings)
    result = Drain(name, "in-process WorkerRuntime")
    try:
        specs = await build_specs(resources, [consumer.value])  # opens the store, migrates: before the clock
        runtime = WorkerRuntime(settings, specs, http_port=0)
        counted = _processed(consumer)
        before = sum(counted.values())
        await runtime.start()
        try:
            await runtime.wait_ready(30)
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


@dataclass
class EndToEnd:
    sent: int = 0
    acknowledged: int = 0
    delivered: int = 0
    seconds: float = 0.0
    ingress_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def end_to_end(args: argparse.Namespace, env: dict[str, str], merchant: MerchantProcess) -> EndToEnd:
    from tests.bench.ingress_bench import connect, free_port, signed_requests, wait_ready

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
    tokens = [new_token() for _ in range(args.e2e_messages)]
    # signed_requests alternates AMS (even) and Alipay+ (odd) paths: bodies follow the same order.
    bodies = [ams_token_created(t) if i % 2 == 0 else aps_token_created(t) for i, t in enumerate(tokens)]
    print(f"  signing {len(bodies)} notifications before the clock starts ...", flush=True)
    requests = signed_requests(alipay_key, port, bodies)
    fingerprints = [access_token_fingerprint(t) for t in tokens]

    quiet = {"stdout": asyncio.subprocess.DEVNULL, "stderr": asyncio.subprocess.DEVNULL}
    ingress = await asyncio.create_subprocess_exec(sys.executable, "-m", "authnotify.cli", "ingress", env=env, **quiet)
    worker_env = {**env, "AUTHNOTIFY_WORKER_HTTP_PORT": str(free_port())}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify.cli", "worker", "token-created", "merchant-events", env=worker_env, **quiet)
    result = EndToEnd()
    try:
        await wait_ready(port, ingress)
        await wait_ready(int(worker_env["AUTHNOTIFY_WORKER_HTTP_PORT"]), worker)
        merchant.reset()
        connections = [await connect(port) for _ in range(args.concurrency)]
        sent_at: dict[str, float] = {}
        statuses: dict[int, int] = {}

        async def drive(offset: int) -> None:
            connection = connections[offset]
            for index in range(offset, len(requests), args.concurrency):
                sent_at[fingerprints[index]] = time.monotonic()
                status = await connection.request(requests[index])
                statuses[status] = statuses.get(status, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(drive(i) for i in range(args.concurrency)))
        result.ingress_seconds = time.monotonic() - started
        result.sent = len(requests)
        result.acknowledged = statuses.get(200, 0)
        if result.acknowledged != result.sent:
            print(f"  ingress answers: {statuses}", flush=True)
        await merchant.wait_for(result.acknowledged, args.timeout)
        for connection in connections:
            assert connection.transport is not None
            connection.transport.close()
        received = {fp: at for fp, at in merchant.received.items() if fp in sent_at}
        result.delivered = len(received)
        result.seconds = max(received.values()) - started
        result.latencies = [at - sent_at[fp] for fp, at in received.items()]
    finally:
        await _terminate(ingress)
        await _terminate(worker)
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

    from shared.logging import configure_logging

    configure_logging("json")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=open(os.devnull, "w")))  # noqa: SIM115


def print_table(drains: dict[str, Drain], e2e: EndToEnd | None, args: argparse.Namespace) -> None:
    bare = drains.get("bare")
    print()
    print(f"{'phase':34} {'how':32} {'msgs':>6} {'msg/s':>8} {'x bare':>7} {'CPU ms/msg':>10}  outcomes")
    for key, drain in drains.items():
        ratio = f"{drain.rate / bare.rate:7.2f}" if bare and bare.rate and key != "bare" else f"{'':>7}"
        cpu = drain.cpu_seconds * 1000 / drain.messages if drain.messages else float("nan")
        outcomes = ",".join(f"{k}={v}" for k, v in sorted(drain.outcomes.items())) or "-"
        print(f"{drain.name:34} {drain.how:32} {drain.messages:6d} {drain.rate:8.0f} {ratio} {cpu:10.3f}  {outcomes}")
    if e2e is not None:
        print()
        print(f"end to end (ingress -> worker token-created+merchant-events -> merchant, subprocesses, PostgreSQL, "
              f"concurrency {args.concurrency}):")
        print(f"  {e2e.delivered} of {e2e.sent} notifications delivered ({e2e.acknowledged} acknowledged by the "
              f"ingress at {e2e.acknowledged / e2e.ingress_seconds:.0f}/s)")
        print(f"  {e2e.delivered / e2e.seconds if e2e.seconds else 0:.0f} notifications/s end to end   "
              f"latency p50 {e2e.percentile(0.5):.1f} ms   p99 {e2e.percentile(0.99):.1f} ms")
    print()
    for key in ("postgresql", "merchant-events"):
        drain = drains.get(key)
        if drain is None:
            continue
        ratio = drain.rate / bare.rate if bare and bare.rate else float("nan")
        met = drain.rate >= GOAL_RATE and (bare is None or ratio >= GOAL_RATIO)
        print(f"goal {drain.name}: {drain.rate:.0f}/s >= {GOAL_RATE:.0f}/s and {ratio:.2f} >= {GOAL_RATIO} x bare: "
              f"{'met' if met else 'NOT met'}")


async def main(args: argparse.Namespace) -> int:
    only = [phase for phase in PHASES if phase in args.only]
    namespace = f"wbench{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    database_name = f"authnotify_bench_{uuid.uuid4().hex[:10]}"
    secret = generate_secret()
    print(f"authnotify workers benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC  cpus={os.cpu_count()}  "
          f"namespace={namespace}  queue={args.queue_type}  messages={args.messages}  phases={','.join(only)}",
          flush=True)
    quiet_logs()
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
    topology = Topology(namespace=namespace, queue_type=QueueType(args.queue_type), retry_delays=(1.0,))
    drains: dict[str, Drain] = {}
    e2e: EndToEnd | None = None
    try:
        if {"postgresql", "e2e"} & set(only):
            postgres_url = await create_database(args.database_url, database_name)
        connection = await aio_pika.connect(args.rabbitmq_url)
        async with connection:
            await declare_topology(await connection.channel(), topology)
        sqlite_settings = Settings(_env_file=None, database_url=f"sqlite+aiosqlite:///{workdir}/bench.db",
                                   **common)  # type: ignore[call-arg]
        assert build_topology(sqlite_settings) == topology
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
            elif phase == "e2e":
                print("end to end: starting ingress and worker subprocesses ...", flush=True)
                env = {name: value for name, value in os.environ.items() if not name.startswith("AUTHNOTIFY_")}
                env.update({
                    "AUTHNOTIFY_RABBITMQ_URL": args.rabbitmq_url, "AUTHNOTIFY_NAMESPACE": namespace,
                    "AUTHNOTIFY_QUEUE_TYPE": args.queue_type, "AUTHNOTIFY_RETRY_DELAYS": "1s",
                    "AUTHNOTIFY_DATABASE_URL": postgres_url or "", "AUTHNOTIFY_TOKEN_KEYS": token_keys,
                    "AUTHNOTIFY_MERCHANTS_FILE": str(workdir / "merchants.toml"),
                })
                e2e = await end_to_end(args, env, merchant)
            if phase in drains:
                drain = drains[phase]
                print(f"  {drain.name}: {drain.messages} in {drain.seconds:.2f} s = {drain.rate:.0f}/s", flush=True)
        print_table(drains, e2e, args)
    finally:
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="workers_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="messages pre-loaded per drain")
    parser.add_argument("--only", type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
                        default=list(PHASES), help=f"comma-separated phases out of {','.join(PHASES)}")
    parser.add_argument("--e2e-messages", type=int, default=5_000, help="notifications sent end to end")
    parser.add_argument("--concurrency", type=int, default=32, help="end-to-end requests in flight")
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per phase")
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "AUTHNOTIFY_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--database-url", default=os.environ.get(
        "AUTHNOTIFY_TEST_DATABASE_URL", "postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL server URL; the run creates (and drops) a database of its own there")
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
