"""``authnotify ingress --processes N``: N processes share the port under one supervisor, which serves their
metrics, restarts a child that dies, and drains them all on SIGTERM (docs/ingress.md#several-processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest

from authnotify.config import Settings
from tests.conftest import TestKeys as Keys
from tests.ingress_harness import (
    PROVIDER_CASES,
    SUCCESS_BODY,
    answer_signature_verifies,
    drain_queue,
    notification_headers,
    wait_until,
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def token_created(marker: str) -> bytes:
    return orjson.dumps({"authorizationNotifyType": "TOKEN_CREATED", "accessToken": f"token-{marker}",
                         "accessTokenExpiryTime": "2027-11-23T10:00:00+08:00", "authState": marker,
                         "userLoginId": "user@example.com"})


@dataclass
class Supervised:
    """The supervisor process, its JSON log lines (its own and its children's, on the shared stderr)."""

    process: asyncio.subprocess.Process
    url: str
    metrics_url: str
    lines: list[dict[str, Any]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    def child_pids(self) -> set[int]:
        started = {line["child_pid"] for line in self.events("ingress_process_started")}
        exited = {line["child_pid"] for line in self.events("ingress_process_exited")}
        return started - exited


@asynccontextmanager
async def supervised_ingress(settings: Settings, keys: Keys, rabbitmq_url: str, tmp_path: Path,
                             *args: str, **variables: str) -> AsyncIterator[Supervised]:
    port, metrics_port = _free_port(), _free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("AUTHNOTIFY_")}
    env.update({
        "AUTHNOTIFY_RABBITMQ_URL": rabbitmq_url, "AUTHNOTIFY_NAMESPACE": settings.namespace,
        "AUTHNOTIFY_QUEUE_TYPE": settings.queue_type, "AUTHNOTIFY_RETRY_DELAYS": "1s,2s",
        "AUTHNOTIFY_HTTP_HOST": "127.0.0.1", "AUTHNOTIFY_HTTP_PORT": str(port),
        "AUTHNOTIFY_METRICS_PORT": str(metrics_port),
        "AUTHNOTIFY_AMS_CLIENT_ID": PROVIDER_CASES[0].client_id,
        "AUTHNOTIFY_AMS_PRIVATE_KEY": keys.ours.private_pem,
        "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": keys.alipay.public_pem,
        **variables,
    })
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "ingress", *args, cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    running = Supervised(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")

    async def read_logs() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace")
            running.text.append(line)
            try:
                document = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(document, dict):
                running.lines.append(document)

    reader = asyncio.create_task(read_logs())
    try:
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.wait_for(reader, 10)


async def answered(http: aiohttp.ClientSession, url: str, body: bytes, keys: Keys) -> tuple[int, bytes, Any]:
    case = PROVIDER_CASES[0]
    async with http.post(url + case.path, data=body,
                         headers=notification_headers(keys.alipay.private_key, case, body)) as response:
        return response.status, await response.read(), response.headers


async def wait_ready(http: aiohttp.ClientSession, running: Supervised, children: int) -> None:
    async def ready() -> bool:
        if running.process.returncode is not None:
            raise AssertionError(f"the supervisor exited: {''.join(running.text)[-2000:]}")
        if len(running.events("ingress_listening")) < children:
            return False
        try:
            async with http.get(running.url + "/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(ready, 30, f"{children} ingress processes to be ready", interval=0.1)


def fresh_connections() -> aiohttp.ClientSession:
    """A new connection per request: the kernel picks a process per connection."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                 connector=aiohttp.TCPConnector(force_close=True, limit=16))


async def test_two_processes_both_answer_signed_notifications_and_sigterm_drains_both(
    make_settings: Callable[..., Settings], keys: Keys, amqp_connection: aio_pika.abc.AbstractConnection,
    rabbitmq_url: str, tmp_path: Path,
) -> None:
    settings = make_settings()
    async with supervised_ingress(settings, keys, rabbitmq_url, tmp_path, "--processes", "2") as running, \
            fresh_connections() as http:
        await wait_ready(http, running, 2)
        children = running.child_pids()
        assert len(children) == 2 and running.process.pid not in children

        bodies = [token_created(f"two-{index}") for index in range(40)]
        answers = await asyncio.gather(*(answered(http, running.url, body, keys) for body in bodies))
        for status, body, headers in answers:
            assert (status, body) == (200, SUCCESS_BODY)
            assert answer_signature_verifies(keys.ours.private_key.public_key(), PROVIDER_CASES[0].path, headers, body)

        async def both_logged() -> bool:
            return len(running.events("notification")) >= len(bodies)

        await wait_until(both_logged, 10, "a log line per notification")
        # Each line names the process that answered: both children did, the supervisor none.
        assert {line["pid"] for line in running.events("notification")} == children

        # Counters are summed over the children; gauges have one series per child, written every second.
        async def metrics() -> str:
            async with http.get(running.metrics_url) as response:
                assert response.status == 200
                return await response.text()

        async def both_connected() -> bool:
            text = await metrics()
            return all(f'authnotify_broker_connected{{pid="{pid}"}} 1.0' in text for pid in children)

        await wait_until(both_connected, 10, "a broker_connected gauge of 1 for each process")
        assert 'authnotify_notifications_received_total{outcome="SUCCESS",provider="ams"} 40.0' in await metrics()

        # Requests in flight when SIGTERM arrives are answered; everything acknowledged reached the queue.
        pending = [token_created(f"drain-{index}") for index in range(300)]
        queue = iter(pending)
        acknowledged: list[bytes] = []
        after_signal = 0
        signalled_at: float | None = None

        async def client() -> None:
            nonlocal after_signal
            for body in queue:
                try:
                    status, _, _ = await answered(http, running.url, body, keys)
                except (TimeoutError, aiohttp.ClientError):
                    return  # the listeners closed
                assert status in (200, 503), status
                if status == 200:
                    acknowledged.append(body)
                    after_signal += signalled_at is not None

        clients = [asyncio.create_task(client()) for _ in range(16)]

        async def busy() -> bool:
            return len(acknowledged) >= 30

        await wait_until(busy, 30, "the processes to acknowledge 30 notifications", interval=0.01)
        signalled_at = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*clients), 30)
        exit_code = await asyncio.wait_for(running.process.wait(), 30)
    log = "".join(running.text)
    assert exit_code == 0, log[-2000:]
    assert "Traceback" not in log
    assert {line.get("pid") for line in running.events("ingress_stopped")} >= children
    assert after_signal > 0
    arrived = await drain_queue(amqp_connection, f"{settings.namespace}.token-created",
                                expect=len(bodies) + len(acknowledged), timeout=10)
    assert set(bodies) | set(acknowledged) <= {message.body for message in arrived}


async def test_a_killed_process_is_replaced_and_the_port_keeps_answering(
    make_settings: Callable[..., Settings], keys: Keys, rabbitmq_url: str, tmp_path: Path,
) -> None:
    settings = make_settings()
    # The variable stands for the flag (what the Kubernetes manifests set).
    async with supervised_ingress(settings, keys, rabbitmq_url, tmp_path,
                                  AUTHNOTIFY_INGRESS_PROCESSES="2") as running, \
            fresh_connections() as http:
        await wait_ready(http, running, 2)
        victim, survivor = sorted(running.child_pids())
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            pids = running.child_pids()
            return len(pids) == 2 and victim not in pids and len(running.events("ingress_listening")) >= 3

        await wait_until(replaced, 30, "the supervisor to start a new process in place of the killed one")
        exited = running.events("ingress_process_exited")
        assert [(line["child_pid"], line["exit_code"]) for line in exited] == [(victim, -signal.SIGKILL)]
        assert survivor in running.child_pids()

        for status, body, _ in await asyncio.gather(
                *(answered(http, running.url, token_created(f"after-{index}"), keys) for index in range(20))):
            assert (status, body) == (200, SUCCESS_BODY)
        running.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.process.wait(), 30) == 0, "".join(running.text)[-2000:]


async def test_processes_that_keep_dying_stop_the_supervisor_with_one_line_and_exit_1(
    make_settings: Callable[..., Settings], keys: Keys, rabbitmq_url: str, tmp_path: Path,
) -> None:
    settings = make_settings()
    async with supervised_ingress(settings, keys, rabbitmq_url, tmp_path, "--processes", "2") as running, \
            fresh_connections() as http:
        await wait_ready(http, running, 2)
        killed: set[int] = set()
        while running.process.returncode is None:
            for pid in running.child_pids() - killed:
                killed.add(pid)
                with contextlib.suppress(ProcessLookupError):  # exited already, its log line not read yet
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.05)
        exit_code = await running.process.wait()
    assert exit_code == 1
    errors = [line for line in running.text if line.startswith("authnotify:")]
    assert errors == ["authnotify: ingress stopped: ingress processes exited 5 times within 60 s "
                      f"(last exit code {-signal.SIGKILL})\n"], "".join(running.text)[-2000:]


@pytest.mark.slow  # runs the authnotify command as a process
async def test_processes_must_be_a_whole_number_of_at_least_one(tmp_path: Path) -> None:
    for value, reason in (("0", "must be at least 1"), ("two", "'two' is not a whole number")):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authnotify", "ingress", "--processes", value, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        assert process.returncode == 2
        assert out == b""
        assert err.decode() == f"authnotify ingress: argument --processes: {reason}\n"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "ingress", cwd=tmp_path,
        env={**os.environ, "AUTHNOTIFY_INGRESS_PROCESSES": "0"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert (process.returncode, out) == (2, b"")
    assert err.decode() == ("authnotify: configuration: AUTHNOTIFY_INGRESS_PROCESSES: "
                            "Input should be greater than or equal to 1\n")
