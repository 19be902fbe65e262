"""A fake merchant webhook endpoint: verifies Standard Webhooks signatures like a real merchant would.

Used by the tests and by ``authnotify dev`` (which prints one line per event). Every POST is checked with
``standardwebhooks.Webhook.verify`` against the endpoint's secret; a bad or missing signature answers 401 and
is recorded as rejected. Failures are scriptable: answer some status N times, or answer slowly.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass(frozen=True)
class ReceivedRequest:
    """One POST that reached the endpoint, whatever it was answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    status: int  # what the endpoint answered

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def event(self) -> dict[str, Any]:
        document: dict[str, Any] = orjson.loads(self.body)
        return document


@dataclass
class _Script:
    status: int
    times: int


@dataclass
class MerchantEndpoint:
    """The state of one fake endpoint: its secret, what it received, what it is told to answer."""

    secret: str
    echo: bool = False  # dev mode: one readable line per delivered event
    out: TextIO | None = None  # where echo prints (stdout by default)
    delay_seconds: float = 0.0  # answer this late (to test the sender's timeout or a drain)
    requests: list[ReceivedRequest] = field(default_factory=list)
    _script: list[_Script] = field(default_factory=list)
    _changed: asyncio.Condition | None = None

    def fail(self, times: int, status: int = 500) -> None:
        """Answer the next ``times`` verified deliveries with ``status`` instead of 204."""
        self._script.append(_Script(status=status, times=times))

    @property
    def delivered(self) -> list[ReceivedRequest]:
        """Verified requests answered 2xx: what the merchant accepted, duplicates included."""
        return [r for r in self.requests if r.verified and 200 <= r.status < 300]

    @property
    def rejected(self) -> list[ReceivedRequest]:
        return [r for r in self.requests if not r.verified]

    def delivered_events(self) -> list[dict[str, Any]]:
        return [r.event for r in self.delivered]

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def wait_until(self, predicate: Callable[[MerchantEndpoint], bool], timeout: float = 10.0) -> None:
        """Waits for ``predicate(self)`` to hold, woken by each request; TimeoutError after ``timeout``."""
        condition = self._condition()
        async with condition:
            await asyncio.wait_for(condition.wait_for(lambda: predicate(self)), timeout)

    async def wait_for_delivered(self, count: int, timeout: float = 10.0) -> list[ReceivedRequest]:
        await self.wait_until(lambda e: len(e.delivered) >= count, timeout)
        return self.delivered

    def _next_status(self) -> int:
        while self._script:
            step = self._script[0]
            if step.times > 0:
                step.times -= 1
                return step.status
            self._script.pop(0)
        return 204

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            Webhook(self.secret).verify(body, headers, json_parse=False)
            verified = True
        except (WebhookVerificationError, ValueError, UnicodeDecodeError):
            # ValueError: a malformed webhook-signature the library cannot split.
            verified = False
        status = self._next_status() if verified else 401
        if verified and self.delay_seconds > 0:
            await asyncio.sleep(self.delay_seconds)
        recorded = ReceivedRequest(request.path, headers, body, verified, status)
        async with self._condition():
            self.requests.append(recorded)
            self._condition().notify_all()
        if self.echo and verified:
            self._print(recorded)
        if status == 401:
            return web.json_response({"error": "invalid signature"}, status=401)
        return web.Response(status=status)

    def _print(self, request: ReceivedRequest) -> None:
        try:
            event = request.event
            data = event.get("data") or {}
            merchant = data.get("referenceMerchantId") or data.get("authClientId") or "-"
            line = (
                f"merchant endpoint <- {event.get('type')} {data.get('provider')} "
                f"authorization {data.get('accessTokenFingerprint')} merchant {merchant} "
                f"status {data.get('status')} id {data.get('authorizationId')} "
                f"(webhook-id {request.webhook_id}, answered {request.status})"
            )
        except (orjson.JSONDecodeError, AttributeError):
            line = f"merchant endpoint <- unreadable body (webhook-id {request.webhook_id})"
        print(line, file=self.out or sys.stdout, flush=True)

    def app(self) -> web.Application:
        application = web.Application()
        # Any path: a registry may point several entries at one sandbox under different paths.
        application.router.add_post("/{tail:.*}", self.handle)
        return application


@dataclass
class RunningMerchantEndpoint:
    endpoint: MerchantEndpoint
    runner: web.AppRunner
    url: str  # base URL, e.g. http://127.0.0.1:40123

    def url_for(self, path: str = "/webhooks") -> str:
        return self.url + path

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def start_merchant_endpoint(
    secret: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    echo: bool = False,
    out: TextIO | None = None,
) -> RunningMerchantEndpoint:
    """Serves a :class:`MerchantEndpoint` on ``host:port`` (0: any free port) until ``aclose``."""
    endpoint = MerchantEndpoint(secret=secret, echo=echo, out=out)
    runner = web.AppRunner(endpoint.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]  # the port the OS chose when port is 0
    return RunningMerchantEndpoint(endpoint=endpoint, runner=runner, url=f"http://{host}:{bound_port}")
