"""``authnotify dev``: the whole pipeline in one process, driven by ``authnotify simulate``.

The dev process runs as a real subprocess in a temporary working directory, on this test's own broker
namespace and free ports, against the real RabbitMQ and a SQLite file; simulate plays Alipay against it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pytest

from authnotify.config import Settings
from authnotify.devtools.devkeys import ensure_dev_keys
from authnotify.messaging.topology import build_topology, delete_topology

pytestmark = pytest.mark.slow  # every test here runs the authnotify command as a process

READY_LINE = "authnotify dev is ready"
RETRY_DELAYS = "200ms,400ms"
START_TIMEOUT = 60.0
LIFECYCLE_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environment(**values: str) -> dict[str, str]:
    """The test process's environment without any AUTHNOTIFY_* of the developer's, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env.update(values)
    return env


@dataclass
class DevProcess:
    process: asyncio.subprocess.Process
    directory: Path
    env: dict[str, str]
    ingress_port: int
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for_output(self, predicate: object, timeout: float) -> None:
        async def until() -> None:
            while not predicate(self):  # type: ignore[operator]
                if self.process.returncode is not None:
                    raise AssertionError(f"dev exited {self.process.returncode}: {''.join(self.stderr)[-2000:]}")
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)

    def output(self) -> str:
        return "".join(self.stdout)


async def _pump(stream: asyncio.StreamReader, lines: list[str], changed: asyncio.Event) -> None:
    while line := await stream.readline():
        lines.append(line.decode(errors="replace"))
        changed.set()
    changed.set()


async def run_cli(directory: Path, env: dict[str, str], *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", *args, cwd=directory, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def dev(tmp_path: Path, rabbitmq_url: str, namespace: str) -> AsyncIterator[DevProcess]:
    ingress_port = free_port()
    env = clean_environment(
        AUTHNOTIFY_RABBITMQ_URL=rabbitmq_url,
        AUTHNOTIFY_NAMESPACE=namespace,
        AUTHNOTIFY_HTTP_PORT=str(ingress_port),
        AUTHNOTIFY_DEV_GATEWAY_PORT=str(free_port()),
        AUTHNOTIFY_DEV_MERCHANT_PORT=str(free_port()),
        AUTHNOTIFY_API_PORT=str(free_port()),
        AUTHNOTIFY_RETRY_DELAYS=RETRY_DELAYS,
        COLUMNS="200",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "dev", cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    running = DevProcess(process, tmp_path, env, ingress_port)
    assert process.stdout is not None and process.stderr is not None
    pumps = [asyncio.create_task(_pump(process.stdout, running.stdout, running.changed)),
             asyncio.create_task(_pump(process.stderr, running.stderr, running.changed))]
    try:
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        await asyncio.gather(*pumps, return_exceptions=True)
        settings = Settings(_env_file=None, rabbitmq_url=rabbitmq_url, namespace=namespace,  # type: ignore[call-arg]
                            retry_delays=RETRY_DELAYS)
        connection = await aio_pika.connect(rabbitmq_url)
        async with connection:
            await delete_topology(await connection.channel(), build_topology(settings))


async def test_dev_carries_a_simulated_lifecycle_to_the_merchant_endpoint(dev: DevProcess) -> None:
    await dev.wait_for_output(lambda d: READY_LINE in d.output(), START_TIMEOUT)
    banner = dev.output()
    assert f"http://127.0.0.1:{dev.ingress_port}/ams/notifyAuthorization" in banner
    assert f"http://127.0.0.1:{dev.ingress_port}/aps/api/v1/authorizations/authNotify" in banner
    assert "simulate lifecycle" in banner
    assert "development keys" in banner and "(created: " in banner
    assert f"http://127.0.0.1:{dev.env['AUTHNOTIFY_API_PORT']}/v1/authorizations" in banner

    # Activation, refreshes, the expiry warning and the expiry (the auth-code flows), and a revocation through
    # the dev API (the token flows), all in under a minute.
    code, out, err = await run_cli(dev.directory, dev.env, "simulate", "lifecycle", "--json", timeout=LIFECYCLE_TIMEOUT)
    summary = json.loads(out)
    assert code == 0, (err, summary)
    assert summary["sent"] == 4 and summary["acknowledged"] == 4 and summary["ok"] is True
    assert summary["answers"] == [{"http": 200, "resultStatus": "S", "resultCode": "SUCCESS", "count": 4}]
    assert summary["signatures"] == {"verified": 4, "bad": 0, "unchecked": 0}
    assert summary["durationSeconds"] < 60
    lifecycle = {(item["provider"], item["flow"]): item["events"] for item in summary["lifecycle"]}
    assert sorted(lifecycle) == [("ams", "auth code"), ("ams", "token"), ("aps", "auth code"), ("aps", "token")]
    for (_, flow), events in lifecycle.items():
        expected = (["authorization.activated", "authorization.refreshed", "authorization.expiring",
                     "authorization.expired"] if flow == "auth code"
                    else ["authorization.activated", "authorization.canceled"])
        assert [e for e in dict.fromkeys(events)] == expected, (flow, events)

    authorizations = summary["authorizations"]
    merchant_lines = [line for line in dev.stdout if line.startswith("merchant endpoint <- ")]
    webhook_ids = [line.split("webhook-id ")[1].split(",")[0] for line in merchant_lines]
    assert len(webhook_ids) == len(set(webhook_ids)), merchant_lines  # one delivery per event

    # The same directory's default SQLite file is what dev stored into.
    code, out, err = await run_cli(dev.directory, clean_environment(), "authorizations", "list", "--json")
    assert code == 0, err
    stored = json.loads(out)
    statuses = sorted(row["status"] for row in stored)
    assert statuses == ["canceled", "canceled", "expired", "expired"]
    canceled = [row for row in stored if row["status"] == "canceled"]
    assert sorted(row["tokenCancelSource"] for row in canceled) == ["ACQUIRER", "MERCHANT"]
    code, out, err = await run_cli(dev.directory, clean_environment(), "authorizations", "list", "--json",
                                   "--status", "expired")
    assert code == 0 and len(json.loads(out)) == 2
    assert {a["accessTokenFingerprint"] for a in authorizations} <= {
        line.split(" authorization ")[1].split()[0] for line in merchant_lines}

    description = json.loads((dev.directory / ".authnotify" / "dev.json").read_text())
    assert description["ingress_url"] == f"http://127.0.0.1:{dev.ingress_port}"
    assert description["api_url"] == f"http://127.0.0.1:{dev.env['AUTHNOTIFY_API_PORT']}"

    dev.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(dev.process.wait(), 30) == 0
    assert_dev_keys_private_and_reusable(dev.directory / ".authnotify")


def assert_dev_keys_private_and_reusable(directory: Path) -> None:
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = {path.name for path in directory.iterdir()}
    assert names >= {"our-private-key.pem", "our-public-key.pem", "alipay-private-key.pem",
                     "alipay-public-key.pem", "token-keys", "merchant-secret", "gateway-secret",
                     "api-key", "api-keys.toml", "merchants.toml", "dev.json", "dev.env"}
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    kept = {p.name: p.read_bytes() for p in directory.iterdir() if p.suffix == ".pem" or "secret" in p.name
            or p.name in ("token-keys", "api-key")}
    keys = ensure_dev_keys(directory)  # what the next run does first
    assert keys.created == ()
    assert kept == {name: (directory / name).read_bytes() for name in kept}


def test_dev_without_a_broker_says_how_to_start_one(tmp_path: Path) -> None:
    env = clean_environment(AUTHNOTIFY_RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
                            AUTHNOTIFY_HTTP_PORT=str(free_port()),
                            AUTHNOTIFY_DEV_GATEWAY_PORT=str(free_port()),
                            AUTHNOTIFY_DEV_MERCHANT_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-m", "authnotify", "dev"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no RabbitMQ at amqp://guest:***@127.0.0.1:" in lines[0]
    assert "scripts/ensure-rabbitmq.sh" in lines[0]


def test_dev_reports_a_taken_port_in_one_line(tmp_path: Path, rabbitmq_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_environment(AUTHNOTIFY_RABBITMQ_URL=rabbitmq_url, AUTHNOTIFY_NAMESPACE="unused-port-test",
                                AUTHNOTIFY_HTTP_PORT=str(free_port()),
                                AUTHNOTIFY_DEV_GATEWAY_PORT=str(port),
                                AUTHNOTIFY_DEV_MERCHANT_PORT=str(free_port()))
        result = subprocess.run([sys.executable, "-m", "authnotify", "dev"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith("set AUTHNOTIFY_DEV_GATEWAY_PORT to a free port")
