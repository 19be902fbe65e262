"""Helpers for the ingress tests: a running ingress, Alipay-style signing done independently of
``authnotify.alipay.signature``, and reading what reached the broker."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, unquote

import aio_pika
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from authnotify.alipay.notifications import NOTIFY_PATHS
from authnotify.config import Settings
from authnotify.ingress.app import INFLIGHT_KEY, PUBLISHER_KEY, InflightLimit, create_app
from authnotify.ingress.server import ingress_runner
from authnotify.messaging.publisher import Publisher
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


def iso_request_time(*, millis: bool = False, offset_hours: int = 0, shift_seconds: float = 0.0) -> str:
    """Now (plus ``shift_seconds``) as Alipay writes it: ISO 8601 with an explicit offset."""
    zone = timezone(timedelta(hours=offset_hours))
    moment = datetime.now(UTC).astimezone(zone) + timedelta(seconds=shift_seconds)
    return moment.isoformat(timespec="milliseconds" if millis else "seconds")


def epoch_ms_request_time(shift_seconds: float = 0.0) -> str:
    return str(int((time.time() + shift_seconds) * 1000))


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
    runner = ingress_runner(app)
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


RejectionRow = tuple[str, str, Any, dict[str, str], int, str]  # name, method, body, headers, HTTP status, code


def rejection_rows(case: ProviderCase, keys: Any, body: bytes) -> list[RejectionRow]:
    """One request per row of the ingress's status table that is not a success; ``body`` is a valid one."""
    alipay = keys.alipay.private_key
    other_key = keys.ours.private_key  # a valid RSA key that is not Alipay's
    good = notification_headers(alipay, case, body)
    other_path = next(c.path for c in PROVIDER_CASES if c is not case)
    too_big = b'{"authorizationNotifyType":"TOKEN_CREATED","pad":"' + b"x" * (64 * 1024) + b'"}'

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for start_at in range(0, len(data), 8192):
            yield data[start_at:start_at + 8192]

    def without(name: str) -> dict[str, str]:
        return {k: v for k, v in good.items() if k != name}

    return [
        ("no Signature", "POST", body, without("Signature"), 401, "INVALID_SIGNATURE"),
        ("garbage Signature", "POST", body, {**good, "Signature": "algorithm=RSA256,keyVersion=1,signature=%%%"},
         401, "INVALID_SIGNATURE"),
        ("wrong algorithm", "POST", body, {**good, "Signature": good["Signature"].replace("RSA256", "RSA")},
         401, "INVALID_SIGNATURE"),
        ("signed by another key", "POST", body, notification_headers(other_key, case, body), 401, "INVALID_SIGNATURE"),
        ("body changed after signing", "POST", body + b" ", good, 401, "INVALID_SIGNATURE"),
        ("signed for the other path", "POST", body, notification_headers(alipay, case, body, signed_path=other_path),
         401, "INVALID_SIGNATURE"),
        ("Request-Time changed", "POST", body, {**good, "Request-Time": epoch_ms_request_time()}, 401,
         "INVALID_SIGNATURE"),
        ("no Request-Time", "POST", body, without("Request-Time"), 401, "INVALID_SIGNATURE"),
        ("no Client-Id", "POST", body, without("Client-Id"), 401, "INVALID_CLIENT"),
        ("unknown Client-Id, validly signed", "POST", body,
         notification_headers(alipay, case, body, client_id="UNKNOWN_CLIENT"), 401, "INVALID_CLIENT"),
        ("unknown Client-Id and no signature", "POST", body, {"Content-Type": "application/json", "Client-Id": "x"},
         401, "INVALID_CLIENT"),
        ("GET", "GET", None, good, 405, "METHOD_NOT_SUPPORTED"),
        ("PUT", "PUT", body, good, 405, "METHOD_NOT_SUPPORTED"),
        ("DELETE with text/plain", "DELETE", body, {**good, "Content-Type": "text/plain"}, 405, "METHOD_NOT_SUPPORTED"),
        ("text/plain", "POST", body, {**good, "Content-Type": "text/plain"}, 415, "MEDIA_TYPE_NOT_ACCEPTABLE"),
        ("form encoded", "POST", body, {**good, "Content-Type": "application/x-www-form-urlencoded"}, 415,
         "MEDIA_TYPE_NOT_ACCEPTABLE"),
        ("no Content-Type", "POST", body, without("Content-Type"), 415, "MEDIA_TYPE_NOT_ACCEPTABLE"),
        ("text/plain and unknown client", "POST", body, {"Content-Type": "text/plain", "Client-Id": "x"}, 415,
         "MEDIA_TYPE_NOT_ACCEPTABLE"),
        ("over 64 KiB, signed", "POST", too_big, notification_headers(alipay, case, too_big), 413, "PARAM_ILLEGAL"),
        ("over 64 KiB, chunked, no Content-Length", "POST", chunked(too_big),
         notification_headers(alipay, case, too_big), 413, "PARAM_ILLEGAL"),
    ]


@asynccontextmanager
async def ingress_on_memory(settings: Settings, publisher: Any, **options: Any) -> AsyncIterator[RunningIngress]:
    """The ingress publishing to ``publisher`` (an in-memory one): its checks and answers, without a broker."""
    app = create_app(settings, publisher=publisher, **options)
    runner = ingress_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield RunningIngress(f"http://{host}:{port}", app, runner, settings)
    finally:
        await runner.cleanup()
