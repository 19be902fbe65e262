"""The token lifecycle at scale: the scheduler's pass, refreshes through token-refresh, and the API's access token.

Run: ``make bench-lifecycle`` (= ``.venv/bin/python -m tests.bench.lifecycle_bench``), options after
``BENCH_ARGS=``, e.g. ``BENCH_ARGS="--authorizations 20000 --api-seconds 10"``.

A PostgreSQL database is created for the run (dropped afterwards) and filled with ``--authorizations``
(100,000) active Alipay+ authorizations, tokens encrypted as the store keeps them, access tokens expiring
evenly over the next 30 days (refresh tokens 180 days after): about 1/30 of them are due for a refresh.
Everything runs in a broker namespace of its own (deleted afterwards).

* ``scheduler``: one pass of the scheduler (in this process, real store and confirmed publisher): the first
  pass claims and publishes the whole backlog of due refresh requests; the second finds nothing new (the
  steady state, every minute in production). Goal: a pass under 1 s.
* ``refresh``: one token-refresh worker (in this process, JSON logs to /dev/null as in production) drains
  ``--refreshes`` of those requests against the sandbox gateway (a separate process, checking our signatures
  and signing its answers): claim, ``applyToken`` REFRESH_TOKEN, the new tokens stored, the
  ``authorization.refreshed`` event published with confirms. Refreshes per second.
* ``api``: ``authnotify api`` as a subprocess; ``POST /v1/authorizations/{id}/access-token`` open-loop at
  ``--api-rate`` (200/s) for ``--api-seconds`` over random authorizations (none within a minute of expiry);
  latency of each answer from its scheduled send time. Goal: p99 under 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import rsa

from authnotify.api.keys import new_api_key
from authnotify.config import Settings, TokenKeys
from authnotify.config.keys import private_key_pem, public_key_pem
from authnotify.domain.authorizations import access_token_fingerprint, new_authorization_id
from authnotify.messaging.connection import Broker
from authnotify.messaging.publisher import ConfirmedPublisher
from authnotify.messaging.topology import Consumer, build_topology, declare_topology, delete_topology
from authnotify.observability.metrics import MESSAGES_PROCESSED
from authnotify.scheduler.process import Scheduler, schedule_of
from authnotify.store import SqlStore
from tests.bench.workers_bench import create_database, drop_database, quiet_logs

PHASES = ("scheduler", "refresh", "api")
AUTH_CLIENT_ID = "218823863726123456789"
APS_CLIENT_ID = "2188120123456789"


# --- the sandbox gateway, in a process of its own ---------------------------------------------------------


async def serve_gateway(directory: str) -> None:
    from authnotify.config.keys import load_private_key, load_public_key
    from authnotify.devtools.sandbox.alipay_gateway import AlipayGateway, start_alipay_gateway

    keys = Path(directory)
    gateway = AlipayGateway(alipay_private_key=load_private_key(f"@{keys / 'alipay.pem'}"),
                            client_public_key=load_public_key(f"@{keys / 'ours.pub'}"), aps_client_id=APS_CLIENT_ID)
    running = await start_alipay_gateway(gateway, port=0)
    print(running.url, flush=True)
    await asyncio.Event().wait()


async def start_process(*args: str, env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(sys.executable, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.DEVNULL)
    assert process.stdout is not None
    first_line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().strip()
    return process, first_line


async def terminate(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()


# --- filling the database ---------------------------------------------------------------------------------


async def fill(database_url: str, token_key: str, count: int) -> tuple[list[str], float]:
    """``count`` active authorizations; returns the ids of those not due for a day, and the seconds it took."""
    import asyncpg
    from sqlalchemy.engine import make_url

    started = time.perf_counter()
    store = await SqlStore.connect(database_url, TokenKeys([token_key]))  # migrates
    await store.close()
    fernet = Fernet(token_key)
    now = datetime.now(UTC)
    rows, tokens, far = [], [], []
    for index in range(count):
        access, refresh = f"2810AT{secrets.token_hex(16)}", f"2810RT{secrets.token_hex(16)}"
        expires = now + timedelta(seconds=60 + (30 * 86400 - 60) * index / count)
        authorization_id, fingerprint = new_authorization_id(), access_token_fingerprint(access)
        rows.append((authorization_id, fingerprint, "aps", fingerprint, "active", fernet.encrypt(access.encode()),
                     fernet.encrypt(refresh.encode()), expires, expires + timedelta(days=180), AUTH_CLIENT_ID,
                     "M-BENCH", f"agr-{index}", now, now, now))
        tokens.append((fingerprint, "aps", authorization_id, 0, now))
        if expires > now + timedelta(days=1):
            far.append(authorization_id)
    connection = await asyncpg.connect(make_url(database_url).set(drivername="postgresql").render_as_string(
        hide_password=False))
    try:
        async with connection.transaction():
            await connection.execute("SET CONSTRAINTS ALL DEFERRED")
            await connection.copy_records_to_table("authorization_tokens", records=tokens, columns=[
                "access_token_fingerprint", "provider", "authorization_id", "generation", "recorded_at"])
            await connection.copy_records_to_table("authorizations", records=rows, columns=[
                "authorization_id", "access_token_fingerprint", "provider", "first_access_token_fingerprint",
                "status", "access_token_encrypted", "refresh_token_encrypted", "access_token_expires_at",
                "refresh_token_expires_at", "auth_client_id", "reference_merchant_id", "reference_agreement_id",
                "created_at", "updated_at", "activated_at"])
        await connection.execute("ANALYZE")
    finally:
        await connection.close()
    return far, time.perf_counter() - started


# --- the phases ---------------------------------------------------------------------------------------------


def processed(consumer: Consumer) -> float:
    total = 0.0
    for metric in MESSAGES_PROCESSED.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("queue") == consumer.value:
                total += sample.value
    return total


async def bench_scheduler(settings: Settings, store: SqlStore) -> dict[str, Any]:
    topology = build_topology(settings)
    broker = Broker(settings.broker_url(), topology, connection_name="bench-scheduler")
    publisher = ConfirmedPublisher(broker, name="bench", confirm_timeout=30.0)
    await publisher.wait_ready(30)
    try:
        scheduler = Scheduler(store, publisher, topology, schedule_of(settings, topology))
        first = await scheduler.run_pass()
        second = await scheduler.run_pass()
        third = await scheduler.run_pass()
    finally:
        await publisher.close()
        await broker.close()
    return {"first": first, "steady": min(second.seconds, third.seconds), "steady_claimed": second.claimed}


async def bench_refresh(settings: Settings, count: int, timeout: float) -> tuple[int, float]:
    from authnotify.workers.process import Workers
    from authnotify.workers.registry import build_specs
    from authnotify.workers.resources import Resources

    resources = Resources(settings)
    specs = await build_specs(resources, [Consumer.TOKEN_REFRESH.value])
    workers = Workers(settings, specs, http_port=0)
    before = processed(Consumer.TOKEN_REFRESH)
    await workers.start()
    try:
        await workers.wait_ready(30)
        started = time.perf_counter()
        deadline = started + timeout
        while processed(Consumer.TOKEN_REFRESH) - before < count and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        done = int(processed(Consumer.TOKEN_REFRESH) - before)
        seconds = time.perf_counter() - started
    finally:
        await workers.stop()
        await resources.aclose()
    return done, seconds


async def bench_api(env: dict[str, str], port: int, key: str, ids: list[str], rate: float,
                    seconds: float) -> list[float]:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "authnotify", "api", env=env,
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    latencies: list[float] = []
    failures = 0
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url + "/readyz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
            for authorization_id in ids[:50]:  # warm: connections, prepared statements
                async with session.post(f"{url}/v1/authorizations/{authorization_id}/access-token",
                                        headers=headers) as response:
                    await response.read()

            async def one(scheduled: float, authorization_id: str) -> None:
                nonlocal failures
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                async with session.post(f"{url}/v1/authorizations/{authorization_id}/access-token",
                                        headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        failures += 1
                latencies.append(time.perf_counter() - scheduled)

            start = time.perf_counter() + 0.2
            total = int(rate * seconds)
            await asyncio.gather(*(one(start + i / rate, random.choice(ids)) for i in range(total)))
    finally:
        await terminate(process)
    if failures:
        print(f"note: {failures} access-token answers were not 200", file=sys.stderr)
    return sorted(latencies)


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, max(0, int(q * len(values) + 0.5) - 1))] if values else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main(args: argparse.Namespace) -> int:
    quiet_logs()
    name = f"authnotify_lifecycle_bench_{uuid.uuid4().hex[:8]}"
    database_url = await create_database(args.database_url, name)
    directory = Path(tempfile.mkdtemp(prefix="lifecycle-bench-"))
    ours = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "alipay.pem").write_text(private_key_pem(alipay))
    (directory / "ours.pub").write_text(public_key_pem(ours.public_key()))
    gateway, gateway_url = await start_process("-m", "tests.bench.lifecycle_bench", "--serve-gateway", str(directory))
    token_key = Fernet.generate_key().decode()
    api_key = new_api_key("bench", ["tokens:read"])
    (directory / "keys.toml").write_text(api_key.toml_entry())
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env.update(AUTHNOTIFY_RABBITMQ_URL=args.rabbitmq_url, AUTHNOTIFY_DATABASE_URL=database_url,
               AUTHNOTIFY_NAMESPACE=f"bench{uuid.uuid4().hex[:8]}", AUTHNOTIFY_QUEUE_TYPE=args.queue_type,
               AUTHNOTIFY_TOKEN_KEYS=token_key, AUTHNOTIFY_APS_CLIENT_ID=APS_CLIENT_ID,
               AUTHNOTIFY_APS_PRIVATE_KEY=private_key_pem(ours),
               AUTHNOTIFY_APS_ALIPAY_PUBLIC_KEY=public_key_pem(alipay.public_key()),
               AUTHNOTIFY_APS_GATEWAY_URL=gateway_url, AUTHNOTIFY_API_PORT=str(api_port),
               AUTHNOTIFY_API_KEYS_FILE=str(directory / "keys.toml"), AUTHNOTIFY_WORKER_HTTP_PORT="0",
               AUTHNOTIFY_LOG_FORMAT="json")
    settings = Settings(_env_file=None, **{k.removeprefix("AUTHNOTIFY_").lower(): v  # type: ignore[call-arg]
                                           for k, v in env.items() if k.startswith("AUTHNOTIFY_")})
    topology = build_topology(settings)
    store: SqlStore | None = None
    try:
        print(f"filling {args.authorizations:,} authorizations ...", file=sys.stderr)
        far, fill_seconds = await fill(database_url, token_key, args.authorizations)
        store = await SqlStore.connect(database_url, settings.token_keys)
        import aio_pika

        connection = await aio_pika.connect(args.rabbitmq_url)
        async with connection:
            await declare_topology(await connection.channel(), topology)
        lines = [f"authnotify lifecycle bench: {args.authorizations:,} active authorizations in PostgreSQL "
                 f"(filled in {fill_seconds:.1f} s), {args.queue_type} queues"]
        if "scheduler" in args.only:
            result = await bench_scheduler(settings, store)
            first = result["first"]
            lines.append(f"  scheduler, first pass (backlog)  {first.seconds:7.3f} s   {first.refresh_requests:,} refresh "
                         f"requests published with confirms, {first.warnings} warnings")
            lines.append(f"  scheduler, steady pass           {result['steady']:7.3f} s   ({result['steady_claimed']} "
                         "claimed: nothing new due)   goal < 1 s")
        if "refresh" in args.only:
            done, seconds = await bench_refresh(settings, args.refreshes, args.timeout)
            lines.append(f"  token-refresh, one worker        {done / seconds:7.1f} refreshes/s   ({done:,} in "
                         f"{seconds:.1f} s, against the sandbox gateway in its own process)")
        if "api" in args.only:
            latencies = await bench_api(env, api_port, api_key.key, far, args.api_rate, args.api_seconds)
            ms = [value * 1000 for value in latencies]
            lines.append(f"  POST access-token at {args.api_rate:g}/s      p50 {percentile(ms, 0.5):.1f} ms  "
                         f"p99 {percentile(ms, 0.99):.1f} ms  max {ms[-1]:.1f} ms   ({len(ms):,} requests, "
                         "open loop)   goal p99 < 20 ms")
        print("\n".join(lines))
    finally:
        if store is not None:
            await store.close()
        await terminate(gateway)
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(args.rabbitmq_url)
            async with connection:
                await delete_topology(await connection.channel(), topology)
        await drop_database(args.database_url, name)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lifecycle_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--authorizations", type=int, default=100_000)
    parser.add_argument("--refreshes", type=int, default=2_000, help="refresh requests the worker drains")
    parser.add_argument("--api-rate", type=float, default=200.0, help="access-token requests per second")
    parser.add_argument("--api-seconds", type=float, default=20.0)
    parser.add_argument("--only", type=lambda s: [p.strip() for p in s.split(",") if p.strip()], default=list(PHASES),
                        help=f"comma-separated phases out of {','.join(PHASES)}")
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="classic")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--rabbitmq-url", default=os.environ.get(
        "AUTHNOTIFY_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--database-url", default=os.environ.get(
        "AUTHNOTIFY_TEST_DATABASE_URL", "postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL server URL; the run creates (and drops) a database of its own there")
    parser.add_argument("--serve-gateway", metavar="DIR", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    arguments = parse_args()
    if arguments.serve_gateway:
        uvloop.run(serve_gateway(arguments.serve_gateway))
    else:
        sys.exit(uvloop.run(main(arguments)))
