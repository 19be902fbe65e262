"""Slow clients against a real ingress: memory, and whether Alipay still gets answers (``make bench-slowloris``).

An ``authnotify ingress`` process (its own, on the local RabbitMQ, a fresh namespace of classic queues) is
attacked by ``--connections`` connections at once, each sending a notification's headers (the right
Client-Id, a current Request-Time: nothing a stranger cannot know) and then a 64 KiB body it never finishes:
``--mode stall`` sends 65,000 of the 65,536 bytes at once and waits, ``--mode trickle`` sends 1 KiB a
second. A connection the ingress closes is opened again, so the pressure stays for ``--duration`` seconds.
Meanwhile a correctly signed notification is sent on a fresh connection every ``--interval`` seconds.

Printed: the ingress's resident memory (before, peak from /proc VmHWM), the connections held and cut, and
for the valid notifications their answers and latencies. Goal: peak under 300 MiB, every notification
answered within 5 s. Figures, not a test: nothing is asserted.

    make bench-slowloris
    make bench-slowloris BENCH_ARGS="--mode trickle --duration 40"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiohttp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from authnotify.messaging.topology import QueueType, Topology, delete_topology

AMS_CLIENT_ID = "SANDBOX_5YBX2N2ZBENCH0001"
PATH = "/ams/notifyAuthorization"
DECLARED = 65536


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def request_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def sign(key: rsa.RSAPrivateKey, client_id: str, when: str, body: bytes) -> str:
    content = f"POST {PATH}\n{client_id}.{when}.".encode() + body
    signature = base64.b64encode(key.sign(content, padding.PKCS1v15(), hashes.SHA256())).decode()
    return f"algorithm=RSA256,keyVersion=1,signature={quote(signature, safe='')}"


@dataclass
class Attack:
    opened: int = 0
    held: int = 0
    cut: int = 0
    refused_to_connect: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def slow_client(port: int, mode: str, attack: Attack, stop: asyncio.Event) -> None:
    head = (f"POST {PATH} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nClient-Id: {AMS_CLIENT_ID}\r\n"
            f"Signature: algorithm=RSA256,keyVersion=1,signature=AAAA\r\nContent-Length: {DECLARED}\r\n")
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            attack.refused_to_connect += 1
            await asyncio.sleep(0.5)
            continue
        attack.opened += 1
        attack.held += 1
        try:
            writer.write(f"{head}Request-Time: {request_time()}\r\n\r\n".encode())
            if mode == "stall":
                writer.write(b"x" * 65000)
                await writer.drain()
                await reader.read(65536)  # returns when the ingress answers or closes
            else:
                sent = 0
                while sent < 65000 and not stop.is_set() and not reader.at_eof():
                    writer.write(b"x" * 1024)
                    await writer.drain()
                    sent += 1024
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(reader.read(65536), 1.0)
                        break
        except (ConnectionError, OSError):
            pass
        finally:
            attack.held -= 1
            attack.cut += 1
            writer.close()


async def valid_notifications(port: int, key: rsa.RSAPrivateKey, interval: float, stop: asyncio.Event,
                              results: list[tuple[float, int]]) -> None:
    index = 0
    while not stop.is_set():
        index += 1
        body = (b'{"authorizationNotifyType":"TOKEN_CREATED","accessToken":"bench-' + str(index).encode()
                + b'","result":{"resultCode":"SUCCESS","resultStatus":"S","resultMessage":"success"}}')
        when = request_time()
        headers = {"Content-Type": "application/json; charset=UTF-8", "Client-Id": AMS_CLIENT_ID,
                   "Request-Time": when, "Signature": sign(key, AMS_CLIENT_ID, when, body)}
        started = time.perf_counter()
        status = 0
        try:
            connector = aiohttp.TCPConnector(force_close=True)  # a fresh connection each time, as Alipay's
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
                async with http.post(f"http://127.0.0.1:{port}{PATH}", data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        results.append((time.perf_counter() - started, status))
        await asyncio.sleep(interval)


async def run(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="authnotify-slowloris-"))
    ours = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (work / "ours.pem").write_bytes(ours.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (work / "alipay.pub").write_bytes(alipay.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env.update({
        "AUTHNOTIFY_RABBITMQ_URL": args.rabbitmq_url, "AUTHNOTIFY_NAMESPACE": namespace,
        "AUTHNOTIFY_QUEUE_TYPE": "classic", "AUTHNOTIFY_HTTP_HOST": "127.0.0.1", "AUTHNOTIFY_HTTP_PORT": str(port),
        "AUTHNOTIFY_METRICS_PORT": str(free_port()), "AUTHNOTIFY_AMS_CLIENT_ID": AMS_CLIENT_ID,
        "AUTHNOTIFY_AMS_PRIVATE_KEY": f"@{work / 'ours.pem'}", "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": f"@{work / 'alipay.pub'}",
        "AUTHNOTIFY_LOG_FORMAT": "json",
    })
    log = (work / "ingress.log").open("wb")
    ingress = subprocess.Popen([sys.executable, "-m", "authnotify", "ingress"], env=env, stdout=log, stderr=log)
    stop = asyncio.Event()
    attack = Attack()
    results: list[tuple[float, int]] = []
    samples: list[int] = []
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as ready:
                        if ready.status == 200:
                            break
                if time.monotonic() > deadline or ingress.poll() is not None:
                    raise SystemExit(f"the ingress did not get ready (see {work / 'ingress.log'})")
                await asyncio.sleep(0.2)
        before = rss_kib(ingress.pid)
        print(f"ingress pid {ingress.pid} ready; RSS before the attack {before / 1024:.0f} MiB; "
              f"{args.connections} slow connections, mode {args.mode}, {args.duration:g} s")
        senders = asyncio.ensure_future(valid_notifications(port, alipay, args.interval, stop, results))
        started = time.monotonic()
        for index in range(args.connections):  # ramp up over about two seconds
            attack.tasks.append(asyncio.ensure_future(slow_client(port, args.mode, attack, stop)))
            if index % 200 == 199:
                await asyncio.sleep(0.1)
        held_peak = 0
        while time.monotonic() - started < args.duration:
            samples.append(rss_kib(ingress.pid))
            held_peak = max(held_peak, attack.held)
            await asyncio.sleep(0.25)
        stop.set()
        peak = rss_kib(ingress.pid, "VmHWM")
        senders.cancel()
        for task in attack.tasks:
            task.cancel()
        await asyncio.gather(senders, *attack.tasks, return_exceptions=True)
    finally:
        ingress.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            ingress.wait(30)
        log.close()
        connection = await aio_pika.connect(args.rabbitmq_url)
        async with connection:
            await delete_topology(await connection.channel(), Topology(namespace, QueueType.CLASSIC))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    latencies = sorted(latency for latency, _ in results)
    statuses: dict[int, int] = {}
    for _, status in results:
        statuses[status] = statuses.get(status, 0) + 1
    within = sum(1 for latency, status in results if status and latency <= 5.0)
    print(f"slow connections: opened {attack.opened} (held at once, at most {held_peak}), cut by the ingress "
          f"{attack.cut}, refused at connect {attack.refused_to_connect}")
    print(f"ingress RSS: before {before / 1024:.0f} MiB, peak (VmHWM) {peak / 1024:.0f} MiB, "
          f"median during the attack {statistics.median(samples) / 1024:.0f} MiB")
    if latencies:
        p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
        print(f"valid notifications: {len(results)} sent, statuses {dict(sorted(statuses.items()))}, answered within 5 s "
              f"{within}/{len(results)}; latency median {statistics.median(latencies) * 1000:.0f} ms, p95 "
              f"{p95 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    print(f"goal: peak under 300 MiB -> {'met' if peak < 300 * 1024 else 'NOT met'}; every notification answered "
          f"within 5 s -> {'met' if results and within == len(results) else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between valid notifications")
    parser.add_argument("--mode", choices=("stall", "trickle"), default="stall")
    parser.add_argument("--rabbitmq-url", default=os.environ.get("AUTHNOTIFY_TEST_RABBITMQ_URL",
                                                                  "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
