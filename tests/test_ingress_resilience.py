"""The ingress when things go away: the broker restarting under it, and SIGTERM with requests in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aio_pika
import aiohttp
import orjson
import pytest

from authnotify.config import Settings
from tests.conftest import TestKeys as Keys
from tests.ingress_harness import (
    PROVIDER_CASES,
    drain_queue,
    notification_headers,
    start_ingress,
    wait_until,
)


def token_created(marker: str) -> bytes:
    return orjson.dumps({"authorizationNotifyType": "TOKEN_CREATED", "accessToken": f"tok-{marker}"})


async def rabbitmqctl(*args: str, timeout: float = 120) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)}: {stderr.decode()[-300:]}"


@pytest.mark.broker_restart
async def test_broker_restart_answers_u_during_the_outage_and_s_after_it_without_restarting(
    make_settings: Callable[..., Settings], keys: Keys, amqp_connection: aio_pika.abc.AbstractConnection,
    rabbitmq_url: str,
) -> None:
    ingress = await start_ingress(make_settings())
    case = PROVIDER_CASES[1]
    alipay = keys.alipay.private_key
    accepted: list[bytes] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def notify(marker: str) -> tuple[int, str, float]:
                body = token_created(marker)
                started = time.monotonic()
                async with http.post(ingress.url + case.path, data=body,
                                     headers=notification_headers(alipay, case, body)) as response:
                    result = orjson.loads(await response.read())["result"]
                if response.status == 200:
                    accepted.append(body)
                return response.status, result["resultStatus"], time.monotonic() - started

            async def readyz() -> int:
                async with http.get(ingress.url + "/readyz") as response:
                    return response.status

            assert (await notify("before"))[:2] == (200, "S")
            try:
                await rabbitmqctl("stop_app")

                async def not_ready() -> bool:
                    return await readyz() == 503

                await wait_until(not_ready, 10, "/readyz to report the outage")
                for index in range(5):
                    status, result_status, elapsed = await notify(f"outage-{index}")
                    assert (status, result_status) == (503, "U")
                    assert elapsed < 5.0
            finally:
                # Whatever happened above, the shared broker comes back before this test ends.
                await rabbitmqctl("start_app")
                await rabbitmqctl("await_startup")

            async def ready() -> bool:
                return await readyz() == 200

            await wait_until(ready, 60, "the ingress to reconnect", interval=0.2)
            for index in range(3):
                assert (await notify(f"after-{index}"))[:2] == (200, "S")
    finally:
        await ingress.stop()

    # amqp_connection was cut by the restart too: read the queue on a fresh connection.
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        arrived = await drain_queue(connection, f"{ingress.settings.namespace}.token-created", expect=4)
    assert sorted(m.body for m in arrived) == sorted(accepted)
    assert len(accepted) == 4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_sigterm_drains_in_flight_requests_and_loses_none_it_acknowledged(
    make_settings: Callable[..., Settings], keys: Keys, amqp_connection: aio_pika.abc.AbstractConnection,
    rabbitmq_url: str, tmp_path: Path,
) -> None:
    settings = make_settings()
    port = _free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("AUTHNOTIFY_")}
    env.update({
        "AUTHNOTIFY_RABBITMQ_URL": rabbitmq_url,
        "AUTHNOTIFY_NAMESPACE": settings.namespace,
        "AUTHNOTIFY_QUEUE_TYPE": settings.queue_type,
        "AUTHNOTIFY_RETRY_DELAYS": "1s,2s",
        "AUTHNOTIFY_HTTP_HOST": "127.0.0.1",
        "AUTHNOTIFY_HTTP_PORT": str(port),
        "AUTHNOTIFY_AMS_CLIENT_ID": PROVIDER_CASES[0].client_id,
        "AUTHNOTIFY_AMS_PRIVATE_KEY": keys.ours.private_pem,
        "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": keys.alipay.public_pem,
    })
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "ingress", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    stderr_task = asyncio.create_task(process.stderr.read())  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    case = PROVIDER_CASES[0]
    alipay = keys.alipay.private_key
    acknowledged: list[bytes] = []
    acknowledged_after_signal = 0
    signalled_at: float | None = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                         connector=aiohttp.TCPConnector(limit=32)) as http:

            async def ready() -> bool:
                try:
                    async with http.get(url + "/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(ready, 30, "the ingress subprocess to be ready", interval=0.1)
            # Pre-signed so the client keeps the ingress busy.
            requests = [(body, notification_headers(alipay, case, body))
                        for body in (token_created(str(i)) for i in range(600))]
            queue = iter(requests)

            async def client() -> None:
                nonlocal acknowledged_after_signal
                for body, headers in queue:
                    try:
                        async with http.post(url + case.path, data=body, headers=headers) as response:
                            await response.read()
                    except (TimeoutError, aiohttp.ClientError):
                        return  # the ingress stopped taking requests
                    assert response.status in (200, 503), response.status
                    if response.status == 200:
                        acknowledged.append(body)
                        if signalled_at is not None:
                            acknowledged_after_signal += 1

            clients = [asyncio.create_task(client()) for _ in range(32)]

            async def busy() -> bool:
                return len(acknowledged) >= 100

            await wait_until(busy, 30, "the ingress to acknowledge 100 notifications", interval=0.01)
            signalled_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*clients), 30)
        exit_code = await asyncio.wait_for(process.wait(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = (await stderr_task).decode()
    assert exit_code == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    assert '"ingress_stopped"' in stderr
    # Requests were in flight when the signal came, and they were answered rather than cut off.
    assert acknowledged_after_signal > 0
    arrived = await drain_queue(amqp_connection, f"{settings.namespace}.token-created",
                                expect=len(acknowledged), timeout=10)
    assert set(acknowledged) <= {m.body for m in arrived}
