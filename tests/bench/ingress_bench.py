"""Ingress throughput, latency and CPU against a bare confirming publisher, on the real broker.

Run: ``make bench-ingress`` (= ``.venv/bin/python -m tests.bench.ingress_bench``), options after ``BENCH_ARGS=``
(e.g. ``BENCH_ARGS="--duration 10 --processes 1,2"``).

For each value of ``--processes`` (default 1 and 2):

1. Starts ``authnotify ingress --processes N`` as a subprocess (the way it runs in production: uvloop, JSON logs
   to a pipe that is discarded) in a namespace of its own, with both providers configured.
2. Drives it at a fixed concurrency with correctly signed notifications, signed before the clock starts, over
   keep-alive HTTP/1.1 connections, one request in flight per connection: with ``wrk`` (one thread, the
   pre-signed requests cycled by tests/bench/ingress_wrk.lua) when it is installed, so the client's own CPU
   does not count against the ingress, else with a minimal asyncio client. Reports acknowledged (HTTP 200)
   notifications/s, p50/p99 latency, and the CPU (user + system, from /proc/<pid>/stat) the ingress used per
   acknowledged notification: the supervisor and all its processes together.
3. Drives it open-loop at half the rate measured in step 2 (a paced asyncio client: requests due at a
   wake-up go out together on idle keep-alive connections) and reports p99 latency, measured from each
   request's scheduled send time so client-side queueing counts too, and the CPU per notification there.

Then, in the same run, a bare aio-pika publisher with publisher confirms at the same concurrency publishes the
same messages (bodies, persistent, same properties and headers) through the same exchange to the same (quorum
by default) queue: the ceiling the ingress is measured against; and the bare publisher at half the rate of the
first ingress, for reference. Between phases the queue is purged and the broker left idle for ``--settle``
seconds. A table sums up. ``--profile FILE.svg`` records a py-spy flame graph of each closed loop.

Goals: ingress >= 0.7 x bare publisher; p99 < 50 ms at half rate; <= 0.3 ms CPU per acknowledged notification.
Everything shares the same cores as the broker, so compare the ratio of one run rather than absolute figures
across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
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

import aio_pika
import orjson
from cryptography.hazmat.primitives.asymmetric import rsa

from authnotify.alipay.signature import sign_request_headers
from authnotify.config.keys import private_key_pem, public_key_pem
from authnotify.messaging import headers as messages
from authnotify.messaging.topology import QueueType, Topology, declare_topology, delete_topology

AMS_PATH, APS_PATH = "/ams/notifyAuthorization", "/aps/api/v1/authorizations/authNotify"
AMS_CLIENT_ID, APS_CLIENT_ID = "SANDBOX_BENCH_AMS", "2188120000000000"
SIGNED_POOL = 2000  # distinct pre-signed notifications, cycled (Alipay redelivers identical ones anyway)


@dataclass
class Measurement:
    seconds: float = 0.0
    acknowledged: int = 0
    other: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    # Percentiles (quantile -> ms) computed elsewhere, e.g. by wrk, when there is no list of latencies.
    given: dict[float, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.acknowledged / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if q in self.given:
            return self.given[q]
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def summary(self) -> str:
        others = f", non-200: {self.other}" if self.other else ""
        return (f"{self.rate:8.0f}/s acknowledged  p50 {self.percentile(0.5):6.2f} ms  "
                f"p99 {self.percentile(0.99):6.2f} ms  ({self.acknowledged} in {self.seconds:.1f} s{others})")


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time; just enough parsing to find the status."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        del self.buffer[:end + 4 + length]
        waiter, self.waiter = self.waiter, None
        waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    async def request(self, data: bytes) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)
        return await self.waiter


async def connect(port: int) -> HttpConnection:
    _, protocol = await asyncio.get_running_loop().create_connection(HttpConnection, "127.0.0.1", port)
    return protocol


def notification_bodies(count: int) -> list[bytes]:
    return [orjson.dumps({
        "authorizationNotifyType": "TOKEN_CREATED",
        "accessToken": f"bench-token-{index:06d}-{uuid.uuid4().hex}",
        "accessTokenExpiryTime": "2027-11-23T10:00:00+08:00",
        "authState": "bench", "userLoginId": "bench@example.com",
        "result": {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"},
    }) for index in range(count)]


def signed_requests(key: rsa.RSAPrivateKey, port: int, bodies: Sequence[bytes]) -> list[bytes]:
    requests = []
    for index, body in enumerate(bodies):
        path, client_id = (AMS_PATH, AMS_CLIENT_ID) if index % 2 == 0 else (APS_PATH, APS_CLIENT_ID)
        headers = sign_request_headers(key, method="POST", path=path, client_id=client_id, body=body,
                                       time=str(int(time.time() * 1000)))
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        requests.append(
            (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=UTF-8\r\n"
             f"{head}Content-Length: {len(body)}\r\n\r\n").encode() + body
        )
    return requests


async def closed_loop(port: int, requests: Sequence[bytes], concurrency: int, seconds: float) -> Measurement:
    connections = [await connect(port) for _ in range(concurrency)]
    result = Measurement()
    stop_at = time.perf_counter() + seconds

    async def drive(offset: int, connection: HttpConnection) -> None:
        index = offset
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            status = await connection.request(requests[index % len(requests)])
            result.latencies.append(time.perf_counter() - started)
            if status == 200:
                result.acknowledged += 1
            else:
                result.other[status] = result.other.get(status, 0) + 1
            index += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(drive(i, c) for i, c in enumerate(connections)))
    result.seconds = time.perf_counter() - started
    for connection in connections:
        assert connection.transport is not None
        connection.transport.close()
    return result


WRK_SCRIPT = Path(__file__).with_name("ingress_wrk.lua")
WRK_RESULT = re.compile(r"WRK_RESULT (.*)")


async def wrk_closed_loop(port: int, requests: Sequence[bytes], concurrency: int, seconds: float,
                          wrk: str) -> Measurement:
    """The closed loop driven by wrk (one thread, C, a few % of a core) so the client's CPU does not count
    against the ingress: the Python client costs about as much CPU per request as the ingress itself."""
    with tempfile.TemporaryDirectory(prefix="ingress-bench-") as directory:
        pool = Path(directory, "requests")
        with pool.open("wb") as out:
            for request in requests:
                out.write(b"%d\n" % len(request))
                out.write(request)
        process = await asyncio.create_subprocess_exec(
            wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}/", "--", str(pool),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
    text = output.decode(errors="replace")
    found = WRK_RESULT.search(text)
    if process.returncode != 0 or found is None:
        raise SystemExit(f"wrk failed ({process.returncode}): {text[-500:]}")
    figures = {name: int(value) for name, value in (pair.split("=") for pair in found.group(1).split())}
    result = Measurement(seconds=figures["duration_us"] / 1e6,
                         given={0.5: figures["p50_us"] / 1000, 0.99: figures["p99_us"] / 1000})
    result.acknowledged = figures["requests"] - figures["non2xx"]
    if figures["non2xx"]:
        result.other[0] = figures["non2xx"]  # wrk does not tell which statuses: 0 stands for "non-2xx"
    if figures["socket_errors"] or figures["timeouts"]:
        result.other[-1] = figures["socket_errors"] + figures["timeouts"]
    return result


class PacedConnection(asyncio.Protocol):
    """A keep-alive connection for the open loop: no task or future per request, only a callback."""

    def __init__(self, on_answer: Callable[[PacedConnection, int], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.on_answer = on_answer
        self.scheduled = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        at = self.buffer.find(b"Content-Length:", 0, end)
        if at < 0:
            at = self.buffer.lower().find(b"content-length:", 0, end)
        length = int(self.buffer[at + 15:self.buffer.find(b"\r\n", at)]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        status = int(self.buffer[9:12])
        del self.buffer[:end + 4 + length]
        self.on_answer(self, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def open_loop(port: int, requests: Sequence[bytes], rate: float, seconds: float) -> Measurement:
    """Sends at a fixed rate whatever the answers do; latency counts from the scheduled send time.

    Requests due at a wake-up go out together on idle keep-alive connections (a new one only when all are
    busy), so the client's own cost stays small and a late wake-up still counts against the latency."""
    loop = asyncio.get_running_loop()
    result = Measurement()
    idle: list[PacedConnection] = []
    total = int(rate * seconds)
    answered = 0
    finished = loop.create_future()
    now = time.perf_counter

    def on_answer(connection: PacedConnection, status: int) -> None:
        nonlocal answered
        result.latencies.append(now() - connection.scheduled)
        if status == 200:
            result.acknowledged += 1
        else:
            result.other[status] = result.other.get(status, 0) + 1
        idle.append(connection)
        answered += 1
        if answered == total and not finished.done():
            finished.set_result(None)

    async def open_connection() -> PacedConnection:
        _, protocol = await loop.create_connection(lambda: PacedConnection(on_answer), "127.0.0.1", port)
        return protocol

    idle.extend([await open_connection() for _ in range(32)])
    started = now()
    index = 0
    while index < total:
        current = now()
        while index < total and started + index / rate <= current:
            connection = idle.pop() if idle else await open_connection()
            connection.scheduled = started + index / rate
            assert connection.transport is not None
            connection.transport.write(requests[index % len(requests)])
            index += 1
        if index < total:
            await asyncio.sleep(max(0.0, started + index / rate - now()))
    await finished
    result.seconds = now() - started
    for connection in idle:
        if connection.transport is not None:
            connection.transport.close()
    return result


async def raw_publisher(url: str, topology: Topology, bodies: Sequence[bytes], concurrency: int,
                        seconds: float) -> Measurement:
    """The same messages the ingress publishes (bodies, properties, headers), straight from aio-pika."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(topology.notifications_exchange, ensure=False)
        result = Measurement()
        stop_at = time.perf_counter() + seconds

        async def drive(offset: int) -> None:
            index = offset
            while time.perf_counter() < stop_at:
                message = aio_pika.Message(
                    bodies[index % len(bodies)], message_id=uuid.uuid4().hex, content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers={messages.PROVIDER: "ams", messages.NOTIFY_TYPE: "TOKEN_CREATED",
                             messages.RECEIVED_AT: messages.utc_now_iso(), messages.ATTEMPT: 1},
                )
                started = time.perf_counter()
                await exchange.publish(message, "ams.TOKEN_CREATED", mandatory=True)
                result.latencies.append(time.perf_counter() - started)
                result.acknowledged += 1
                index += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(drive(i) for i in range(concurrency)))
        result.seconds = time.perf_counter() - started
    return result


async def raw_open_loop(url: str, topology: Topology, bodies: Sequence[bytes], rate: float,
                        seconds: float) -> Measurement:
    """The bare publisher at a fixed rate: shows how much of the ingress's tail latency is the broker's."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(topology.notifications_exchange, ensure=False)
        result = Measurement()
        tasks: set[asyncio.Task[None]] = set()

        async def send(index: int, scheduled: float) -> None:
            message = aio_pika.Message(
                bodies[index % len(bodies)], message_id=uuid.uuid4().hex, content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={messages.PROVIDER: "ams", messages.NOTIFY_TYPE: "TOKEN_CREATED",
                         messages.RECEIVED_AT: messages.utc_now_iso(), messages.ATTEMPT: 1},
            )
            await exchange.publish(message, "ams.TOKEN_CREATED", mandatory=True)
            result.latencies.append(time.perf_counter() - scheduled)
            result.acknowledged += 1

        started = time.perf_counter()
        for index in range(int(rate * seconds)):
            scheduled = started + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(index, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - started
    return result


async def purge(url: str, topology: Topology) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.consumer_queue("token-created"), passive=True)
        await queue.purge()


async def settle(args: argparse.Namespace, topology: Topology) -> None:
    """Empties the queue and lets the broker finish with it (a quorum queue compacts its log after a
    purge), so one phase's aftermath does not land in the next phase's figures."""
    await purge(args.rabbitmq_url, topology)
    await asyncio.sleep(args.settle)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """``root`` and every live process descending from it (the ingress's parent and its children)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(parents.get(pid, ()))
    return tree


def cpu_seconds(root: int) -> float:
    """User + system CPU time so far of ``root`` and its descendants, from /proc/<pid>/stat."""
    total = 0
    for pid in process_tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLOCK_TICKS


async def start_profiler(output: str, pid: int, seconds: float) -> asyncio.subprocess.Process:
    """py-spy on the ingress (and its child processes) for the closed-loop phase; its CPU counts against
    the ingress's cores but not against the ingress's own CPU figure."""
    py_spy = Path(sys.executable).with_name("py-spy")
    return await asyncio.create_subprocess_exec(
        str(py_spy), "record", "--subprocesses", "--rate", "200", "--duration", str(max(1, round(seconds))),
        "--format", "raw" if output.endswith(".txt") else "flamegraph", "--output", output, "--pid", str(pid),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_ready(port: int, process: asyncio.subprocess.Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise SystemExit(f"the ingress exited with {process.returncode} before it was ready")
        try:
            connection = await connect(port)
            status = await connection.request(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert connection.transport is not None
            connection.transport.close()
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the ingress did not become ready")


@dataclass
class IngressRun:
    """The figures of one ``authnotify ingress --processes N`` in the run."""

    processes: int
    closed: Measurement
    closed_cpu_ms: float  # CPU per acknowledged notification, the supervisor and every process together
    paced: Measurement
    paced_cpu_ms: float


def cpu_ms_per_ack(cpu_seconds_used: float, measurement: Measurement) -> float:
    return cpu_seconds_used * 1000 / measurement.acknowledged if measurement.acknowledged else float("nan")


async def wait_processes(pid: int, processes: int, timeout: float = 60) -> None:
    """With a supervisor: until it has all its processes (each is ready once /readyz answered on its own)."""
    deadline = time.monotonic() + timeout
    while len(process_tree(pid)) < processes + (1 if processes > 1 else 0):
        if time.monotonic() > deadline:
            raise SystemExit(f"the ingress did not start {processes} processes")
        await asyncio.sleep(0.2)


async def measure_ingress(args: argparse.Namespace, env: dict[str, str], port: int, processes: int,
                          requests: Sequence[bytes], topology: Topology, wrk: str | None) -> IngressRun:
    closed_client = "wrk" if wrk else "python client"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "ingress", "--processes", str(processes), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_processes(process.pid, processes)
        await wait_ready(port, process)
        # Fresh connections for the warm-up: each process gets some, so each has its connection and caches.
        await closed_loop(port, requests, args.concurrency, args.warmup)
        await settle(args, topology)

        label = f"ingress x{processes}"
        profiler = None
        if args.profile:
            chosen = Path(args.profile)
            output = str(chosen.with_stem(f"{chosen.stem}-{processes}")) if len(args.processes) > 1 else args.profile
            profiler = await start_profiler(output, process.pid, args.duration)
        cpu_before = cpu_seconds(process.pid)
        if wrk:
            closed = await wrk_closed_loop(port, requests, args.concurrency, args.duration, wrk)
        else:
            closed = await closed_loop(port, requests, args.concurrency, args.duration)
        closed_cpu = cpu_ms_per_ack(cpu_seconds(process.pid) - cpu_before, closed)
        print(f"{label} ({closed_client:13}) {closed.summary()}  CPU {closed_cpu:.3f} ms/ack", flush=True)
        if profiler is not None:
            await profiler.wait()
            print(f"flame graph of the closed loop: {output}")
        await settle(args, topology)

        half_rate = closed.rate / 2
        cpu_before = cpu_seconds(process.pid)
        paced = await open_loop(port, requests, half_rate, args.duration)
        paced_cpu = cpu_ms_per_ack(cpu_seconds(process.pid) - cpu_before, paced)
        print(f"{label} at {half_rate:5.0f}/s      {paced.summary()}  CPU {paced_cpu:.3f} ms/ack", flush=True)
        await settle(args, topology)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
    return IngressRun(processes, closed, closed_cpu, paced, paced_cpu)


def summary_table(runs: Sequence[IngressRun], raw: Measurement, raw_paced: Measurement) -> list[str]:
    lines = [
        "| | acks/s | x bare publisher | CPU ms/ack (closed) | p50 / p99 closed ms | rate at half | p99 there ms "
        "| CPU ms/ack there |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        lines.append(
            f"| ingress --processes {run.processes} | {run.closed.rate:.0f} | {run.closed.rate / raw.rate:.2f} "
            f"| {run.closed_cpu_ms:.3f} | {run.closed.percentile(0.5):.1f} / {run.closed.percentile(0.99):.1f} "
            f"| {run.paced.rate:.0f} | {run.paced.percentile(0.99):.1f} | {run.paced_cpu_ms:.3f} |")
    lines.append(f"| bare aio-pika publisher | {raw.rate:.0f} | 1.00 | | {raw.percentile(0.5):.1f} / "
                 f"{raw.percentile(0.99):.1f} | {raw_paced.rate:.0f} | {raw_paced.percentile(0.99):.1f} | |")
    return lines


async def main(args: argparse.Namespace) -> int:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    topology = Topology(namespace=namespace, queue_type=QueueType(args.queue_type), retry_delays=(1.0,))
    alipay_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    our_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("AUTHNOTIFY_")}
    env.update({
        "AUTHNOTIFY_RABBITMQ_URL": args.rabbitmq_url, "AUTHNOTIFY_NAMESPACE": namespace,
        "AUTHNOTIFY_QUEUE_TYPE": args.queue_type, "AUTHNOTIFY_RETRY_DELAYS": "1s",
        "AUTHNOTIFY_HTTP_HOST": "127.0.0.1", "AUTHNOTIFY_HTTP_PORT": str(port),
        "AUTHNOTIFY_METRICS_PORT": str(free_port()),
        "AUTHNOTIFY_AMS_CLIENT_ID": AMS_CLIENT_ID, "AUTHNOTIFY_APS_CLIENT_ID": APS_CLIENT_ID,
        "AUTHNOTIFY_AMS_PRIVATE_KEY": private_key_pem(our_key), "AUTHNOTIFY_APS_PRIVATE_KEY": private_key_pem(our_key),
        "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": public_key_pem(alipay_key.public_key()),
        "AUTHNOTIFY_APS_ALIPAY_PUBLIC_KEY": public_key_pem(alipay_key.public_key()),
    })
    print(f"authnotify ingress benchmark  {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC  cpus={os.cpu_count()}  "
          f"queue={args.queue_type}  concurrency={args.concurrency}  duration={args.duration:g}s  "
          f"processes={','.join(map(str, args.processes))}")
    wrk = shutil.which("wrk") if args.client in ("auto", "wrk") else None
    if wrk is None and args.client == "wrk":
        raise SystemExit("ingress_bench: wrk not found (Debian: apt-get install -y wrk)")
    if wrk is None:
        print("closed loop by the Python client, whose CPU counts against the ingress: "
              "install wrk (Debian: apt-get install -y wrk) to measure the ingress alone")
    print(f"signing {SIGNED_POOL} notifications before the clock starts ...", flush=True)
    bodies = notification_bodies(SIGNED_POOL)
    requests = signed_requests(alipay_key, port, bodies)

    try:
        # The topology exists before the first phase (the ingress also declares it, idempotently).
        connection = await aio_pika.connect(args.rabbitmq_url)
        async with connection:
            await declare_topology(await connection.channel(), topology)
        runs = [await measure_ingress(args, env, port, processes, requests, topology, wrk)
                for processes in args.processes]

        raw = await raw_publisher(args.rabbitmq_url, topology, bodies, args.concurrency, args.duration)
        print(f"bare aio-pika publisher   {raw.summary()}", flush=True)
        await settle(args, topology)

        half_rate = runs[0].closed.rate / 2
        raw_paced = await raw_open_loop(args.rabbitmq_url, topology, bodies, half_rate, args.duration)
        print(f"bare publisher at {half_rate:5.0f}/s {raw_paced.summary()}  (for reference)", flush=True)

        print()
        print("\n".join(summary_table(runs, raw, raw_paced)))
        print()
        one = runs[0]
        ratio = one.closed.rate / raw.rate if raw.rate else float("nan")
        p99 = max(run.paced.percentile(0.99) for run in runs)
        print(f"ratio ingress x{one.processes} / bare publisher = {ratio:.2f}  "
              f"(goal >= 0.70: {'met' if ratio >= 0.7 else 'NOT met'})")
        print(f"p99 at half the max rate (worst) = {p99:.1f} ms  (goal < 50 ms: {'met' if p99 < 50 else 'NOT met'})")
        print(f"ingress x{one.processes} CPU per ack, closed = {one.closed_cpu_ms:.3f} ms  "
              f"(goal <= 0.30 ms: {'met' if one.closed_cpu_ms <= 0.3 else 'NOT met'})")
    finally:
        connection = await aio_pika.connect(args.rabbitmq_url)
        async with connection:
            await declare_topology(await connection.channel(), topology)  # makes the delete below total
            await delete_topology(await connection.channel(), topology)
    return 0


def process_counts(value: str) -> list[int]:
    try:
        counts = [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of whole numbers") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("process counts are at least 1")
    return counts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ingress_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds between phases")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                        help="closed-loop load client: wrk when installed (auto), or the Python one")
    parser.add_argument("--processes", type=process_counts, default=[1, 2], metavar="N[,N...]",
                        help="run the ingress phases with each of these --processes values (default: 1,2)")
    parser.add_argument("--profile", metavar="SVG",
                        help="record a py-spy flame graph of the ingress during the closed loop into SVG "
                             "(collapsed stacks instead when it ends in .txt)")
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "AUTHNOTIFY_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    return parser.parse_args()


if __name__ == "__main__":
    import uvloop

    try:
        sys.exit(uvloop.run(main(parse_args())))
    except (OSError, aio_pika.exceptions.AMQPError) as exc:  # e.g. the broker restarted under the run
        print(f"ingress_bench: aborted: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        sys.exit(1)
