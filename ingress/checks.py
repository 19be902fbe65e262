"""The checks every request on an Alipay-facing path goes through: one pipeline, refusing with an answer.

In this order, a request that fails one is answered (:mod:`authnotify.ingress.answers`) and publishes nothing:

1. method POST, else 405;
2. content type ``application/json`` (any charset), else 415;
3. a declared ``Content-Length`` of at most 64 KiB, else 413;
4. ``Client-Id`` equal to the provider's, else 401 ``INVALID_CLIENT``;
5. ``Request-Time`` present, readable and inside the window (``AUTHNOTIFY_REQUEST_TIME_TOLERANCE`` in the
   past, 10 minutes in the future), else 401 ``INVALID_SIGNATURE``: a captured request is not replayable for
   ever;
6. the body, read as it arrives: at most 64 KiB (413), all of it within ``AUTHNOTIFY_INGRESS_BODY_TIMEOUT``
   (else 408 U, and the connection is closed), each chunk counted against the process-wide
   :class:`BodyBudget` (503 U when it is spent);
7. the signature over ``POST <path>\\n<Client-Id>.<Request-Time>.<body>``, else 401 ``INVALID_SIGNATURE``;
   ``<path>`` is the path Alipay calls (``AUTHNOTIFY_NOTIFY_PATH_PREFIX`` in front of the notify path), whatever
   path the request reached us at. The log line of a refusal names the key version, path and client id tried
   and the first part that fails (never the signature or the body).

The headers are checked before the body is read, so a request that cannot be accepted costs no buffering.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from authnotify.alipay.signature import (
    SignatureHeaderError,
    parse_signature_header,
    request_time_in_window,
    verify_signature_header,
)
from authnotify.alipay.verification import explain_notification_signature
from authnotify.config import ProviderConfig
from authnotify.ingress.answers import (
    BODY_TIMEOUT,
    INVALID_CLIENT,
    INVALID_SIGNATURE,
    MEDIA_TYPE_NOT_ACCEPTABLE,
    METHOD_NOT_SUPPORTED,
    PARAM_ILLEGAL,
    UNKNOWN_EXCEPTION,
    Outcome,
)

MAX_BODY_BYTES = 64 * 1024
# Bytes of unfinished bodies the whole process holds at most: 1,024 full-size bodies at once. A slow or
# stalled body beyond that is cut off (the oldest first), never buffered.
BODY_BUDGET_BYTES = 64 * 1024 * 1024
# A body younger than this is never cut off for another: Alipay's bodies (a few KiB) arrive in milliseconds.
BODY_EVICTION_AGE_SECONDS = 1.0


class Refused(Exception):
    """The request fails a check: answer ``outcome``; ``reason`` and ``fields`` go to the log line only."""

    def __init__(self, outcome: Outcome, reason: str, *, close_connection: bool = False, **fields: Any) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason
        self.close_connection = close_connection
        self.fields = fields


class BodyHold:
    """The bytes one unfinished body holds in a :class:`BodyBudget`."""

    __slots__ = ("budget", "bytes", "started", "transport", "evicted")

    def __init__(self, budget: BodyBudget, transport: asyncio.BaseTransport | None, started: float) -> None:
        self.budget = budget
        self.bytes = 0
        self.started = started
        self.transport = transport
        self.evicted = False

    def grow(self, size: int) -> bool:
        return self.budget._grow(self, size)

    def release(self) -> None:
        self.budget._release(self)


class BodyBudget:
    """Bytes held, process-wide, by request bodies still arriving.

    When a chunk would take the total over ``limit``, the bodies that have been arriving longest (older than
    ``eviction_age``) are cut off, their connections closed, until it fits; if it still does not fit, the
    request asking is refused (503 U: Alipay retries). So a flood of slow bodies never grows memory past the
    limit, and a notification that arrives at once still gets through it.
    """

    def __init__(self, limit: int = BODY_BUDGET_BYTES, *, eviction_age: float = BODY_EVICTION_AGE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.held = 0
        self.evictions = 0
        self._eviction_age = eviction_age
        self._clock = clock
        self._holds: dict[BodyHold, None] = {}  # insertion order: the oldest first

    def hold(self, transport: asyncio.BaseTransport | None) -> BodyHold:
        hold = BodyHold(self, transport, self._clock())
        self._holds[hold] = None
        return hold

    def _grow(self, hold: BodyHold, size: int) -> bool:
        if hold.evicted:
            return False
        if self.held + size > self.limit:
            self._evict_for(self.held + size - self.limit, asking=hold)
            if self.held + size > self.limit:
                return False
        hold.bytes += size
        self.held += size
        return True

    def _evict_for(self, excess: int, *, asking: BodyHold) -> None:
        cutoff = self._clock() - self._eviction_age
        for victim in list(self._holds):
            if excess <= 0 or victim.started > cutoff:
                return
            if victim is asking or victim.bytes == 0:
                continue
            excess -= victim.bytes
            victim.evicted = True
            self.evictions += 1
            self._release(victim)
            if victim.transport is not None:
                victim.transport.close()  # its pending read fails: the handler ends, nothing is published

    def _release(self, hold: BodyHold) -> None:
        if self._holds.pop(hold, False) is not False:
            self.held -= hold.bytes
            hold.bytes = 0


def _over_budget() -> Refused:
    return Refused(UNKNOWN_EXCEPTION, "unfinished bodies at the memory limit", close_connection=True)


async def read_body(request: web.BaseRequest, budget: BodyBudget, timeout: float) -> bytes:
    """The whole body, read as it arrives: within ``timeout``, at most 64 KiB, every byte counted in
    ``budget`` while the body is incomplete. Raises :class:`Refused`."""
    content = request.content
    if content.is_eof():
        # All of it came with the headers (a notification usually does): nothing to wait for, so no timer,
        # and a hold only when the budget cannot take it as it stands (it may then cut off a slow body).
        body = content.read_nowait()
        if len(body) > MAX_BODY_BYTES:
            raise Refused(PARAM_ILLEGAL, "body over 64 KiB", close_connection=True)
        if budget.held + len(body) > budget.limit:
            hold = budget.hold(request.transport)
            try:
                if not hold.grow(len(body)):
                    raise _over_budget()
            finally:
                hold.release()
        return body
    hold = budget.hold(request.transport)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise Refused(PARAM_ILLEGAL, "body over 64 KiB", close_connection=True)
                if not hold.grow(len(chunk)):
                    raise _over_budget()
                chunks.append(chunk)
    except TimeoutError:
        raise Refused(BODY_TIMEOUT, f"body not received within {timeout:g}s", close_connection=True) from None
    except (ConnectionError, OSError) as exc:  # the client went, or the budget cut the body off
        reason = "cut off: slow body at the memory limit" if hold.evicted else f"body read failed: {type(exc).__name__}"
        raise Refused(UNKNOWN_EXCEPTION, reason, close_connection=True) from None
    finally:
        hold.release()
    return b"".join(chunks)


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check: the raw body, byte for byte, and who signed it when."""

    body: bytes
    client_id: str
    request_time: str


def _key_version(signature_header: str | None) -> str | None:
    try:
        return parse_signature_header(signature_header).key_version if signature_header else None
    except SignatureHeaderError:
        return None


class RequestChecks:
    """The pipeline for one provider's path; ``verify`` returns the checked request or raises :class:`Refused`.

    ``path`` is the path signatures are verified over: the one Alipay calls (:func:`~authnotify.alipay.
    notifications.signed_path`)."""

    def __init__(self, path: str, config: ProviderConfig, budget: BodyBudget, *, body_timeout: float,
                 request_time_tolerance: float, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._config = config
        self._budget = budget
        self._body_timeout = body_timeout
        self._tolerance = request_time_tolerance
        self._clock = clock

    async def verify(self, request: web.BaseRequest) -> CheckedRequest:
        if request.method != "POST":
            raise Refused(METHOD_NOT_SUPPORTED, request.method[:16])
        if request.content_type.lower() != "application/json":
            raise Refused(MEDIA_TYPE_NOT_ACCEPTABLE, request.content_type[:64])
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            raise Refused(PARAM_ILLEGAL, f"Content-Length {length}", close_connection=True)

        headers = request.headers
        client_id = headers.get("Client-Id")
        if client_id != self._config.client_id:
            raise Refused(INVALID_CLIENT, "missing Client-Id" if client_id is None else "unknown Client-Id")
        request_time = headers.get("Request-Time")
        if not request_time:
            raise Refused(INVALID_SIGNATURE, "missing Request-Time")
        if not request_time_in_window(request_time, self._clock(), self._tolerance):
            raise Refused(INVALID_SIGNATURE, "Request-Time unreadable or outside the accepted window")

        body = await read_body(request, self._budget, self._body_timeout)
        signature = headers.get("Signature")
        if not verify_signature_header(
            self._config.alipay_public_keys, signature, method="POST", path=self.path,
            client_id=client_id, time=request_time, body=body,
        ):
            raise self._signature_refused(request, body)
        return CheckedRequest(body, client_id, request_time)

    def _signature_refused(self, request: web.BaseRequest, body: bytes) -> Refused:
        """The refusal of a signature that does not verify, saying for the log which key version, path and
        client id were tried and which part fails (a path that does verify: the prefix setting is wrong)."""
        verdict = explain_notification_signature(
            keys=self._config.alipay_public_keys, client_id=self._config.client_id, path=self.path,
            headers=request.headers, body=body, tolerance_seconds=self._tolerance, other_paths=(request.path,),
            now=self._clock())
        return Refused(INVALID_SIGNATURE, f"signature does not verify: {verdict.line()}",
                       key_version=_key_version(request.headers.get("Signature")), signed_path=self.path,
                       client_id=self._config.client_id)
