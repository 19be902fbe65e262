"""Helpers for the ingress tests: a running ingress, Alipay-style signing done independently of
``authnotify.alipay.signature``, and reading what reached the broker."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

import aio_pika
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from authnotify.alipay.notifications import NOTIFY_PATHS
from authnotify.ingress.app import INFLIGHT_KEY, PUBLISHER_KEY, InflightLimit, create_app
from authnotify.messaging.publisher import Publisher
from authnotify.config import Settings
from authnotify.messaging.topology import Topology, build_topology
from tests.conftest import AMS_CLIENT_ID, APS_CLIENT_ID

SUCCESS_BODY = b'{"result":{"resultCode":"SUCCESS","resultStatus":"S","resultMessage":"success"}}'


@dataclass(frozen=True)
class ProviderCase:
    name: str
    path: str
    client_id: str
    key_version: str  # Alipay+ examples use keyVersion=0, AMS ones 1


PROVIDER_CASES = (
    ProviderCase("ams", NOTIFY_PATHS["ams"], AMS_CLIENT_ID, "1"),
    ProviderCase("aps", NOTIFY_PATHS["aps"], APS_CLIENT_ID, "0"),
)


def iso_request_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def epoch_ms_request_time() -> str:
    return str(int(time.time() * 1000))


def alipay_signature(private_key: RSAPrivateKey, path: str, client_id: str, request_time: str,
                     body: bytes, *, url_encode: bool = True) -> str:
    """Alipay's scheme written out here, so the tests do not trust the code they test."""
    content = f"POST {path}\n{client_id}.{request_time}.".encode() + body
    raw = private_key.sign(content, padding.PKCS1v15(), hashes.SHA256())
    text = base64.b64encode(raw).decode("ascii")
    return quote(text, safe="") if url_encode else text


def notification_headers(private_key: RSAPrivateKey, case: ProviderCase, body: bytes, *,
                         client_id: str | None = None, request_time: str | None = None,
                         key_version: str | None = None, url_encode: bool = True,
                         spaces: bool = False, lower_case: bool = False,
                         content_type: str = "application/json; charset=UTF-8",
                         signed_path: str | None = None) -> dict[str, str]:
    client_id = case.client_id if client_id is None else client_id
    request_time = request_time or iso_request_time()
    signature = alipay_signature(private_key, signed_path or case.path, client_id, request_time, body,
                                 url_encode=url_encode)
    separator = ", " if spaces else ","
    header = separator.join(
        ("algorithm=RSA256", f"keyVersion={key_version or case.key_version}", f"signature={signature}")
    )
    headers = {"Content-Type": content_type, "Client-Id": client_id, "Request-Time": request_time,
               "Signature": header}
    if lower_case:
        headers = {name.lower(): value for name, value in headers.items()}
    return headers


_SIGNATURE = re.compile(r"algorithm=RSA256,keyVersion=1,signature=([A-Za-z0-9%]+)$")


def answer_signature_verifies(public_key: RSAPublicKey, path: str, headers: Any, body: bytes) -> bool:
    """Checks our answer's signature as Alipay+ would: over POST <path>\\n<Client-Id>.<Response-Time>.<body>."""
    match = _SIGNATURE.match(headers["Signature"])
    if match is None:
        return False
    content = f"POST {path}\n{headers['Client-Id']}.{headers['Response-Time']}.".encode() + body
    try:
        public_key.verify(base64.b64decode(unquote(match.group(1))), content, padding.PKCS1v15(),
                          hashes.SHA256())
    except InvalidSignature:
        return False
    return True


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class RunningIngress:
    url: str
    app: web.Application
    runner: web.AppRunner
    settings: Settings

    @property
    def topology(self) -> Topology:
        return build_topology(self.settings)

    @property
    def publisher(self) -> Publisher:
        return self.app[PUBLISHER_KEY]

    @property
    def inflight(self) -> InflightLimit:
        return self.app[INFLIGHT_KEY]

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_ingress(settings: Settings, *, wait_ready: bool = True) -> RunningIngress:
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    running = RunningIngress(f"http://{host}:{port}", app, runner, settings)
    if wait_ready:
        async def ready() -> bool:
            return running.publisher.ready

        await wait_until(ready, 20, "the ingress to be ready")
    return running


async def drain_queue(connection: aio_pika.abc.AbstractConnection, queue_name: str,
                      *, expect: int = 0, timeout: float = 5.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Takes every message from the queue; waits until at least ``expect`` arrived."""
    channel = await connection.channel()
    queue = await channel.declare_queue(queue_name, passive=True)
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []
    deadline = time.monotonic() + timeout
    while True:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            taken.append(message)
            continue
        if len(taken) >= expect or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    await channel.close()
    return taken


async def message_counts(connection: aio_pika.abc.AbstractConnection, topology: Topology) -> dict[str, int]:
    """Ready messages in every queue of the namespace, by queue name (non-empty ones only)."""
    channel = await connection.channel()
    counts: dict[str, int] = {}
    for name in topology.all_queue_names():
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count or 0
        if count:
            counts[name] = count
    await channel.close()
    return counts
