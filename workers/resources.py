"""What handlers depend on, opened once per worker process and shared by every consumer in it."""

from __future__ import annotations

import asyncio

import aiohttp

from authnotify.alipay.client import APPLY_TOKEN_TIMEOUT_SECONDS, AlipayClient
from authnotify.config import Settings
from authnotify.observability.tracing import http_trace_configs
from authnotify.store import AuthorizationStore, open_store

# Long enough for a merchant delivery (15 s) and applyToken (5 s); each caller sets its own tighter timeout.
HTTP_TIMEOUT_SECONDS = 30.0


class Resources:
    """The store and the HTTP client session, each created on first use and closed by :meth:`aclose`."""

    def __init__(self, settings: Settings, *, store: AuthorizationStore | None = None) -> None:
        self.settings = settings
        self._store = store
        self._owns_store = store is None
        self._http: aiohttp.ClientSession | None = None
        self._store_lock = asyncio.Lock()

    async def store(self) -> AuthorizationStore:
        """The store, opened once with migrations applied (several consumers may ask at once)."""
        async with self._store_lock:
            if self._store is None:
                self._store = await open_store(self.settings.store_url(), self.settings.require_token_keys())
            return self._store

    async def alipay_clients(self, *, timeout: float = APPLY_TOKEN_TIMEOUT_SECONDS) -> dict[str, AlipayClient]:
        """A client per configured provider (its keys required); ConfigError (one line) when AMS lacks
        customerBelongsTo."""
        return alipay_clients(self.settings, await self.http(), timeout=timeout)

    async def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            # With tracing on, each call (applyToken, a merchant delivery) is a span of the message's trace.
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS),
                                               trace_configs=http_trace_configs())
        return self._http

    async def aclose(self) -> None:
        if self._http is not None and not self._http.closed:
            await self._http.close()
        self._http = None
        if self._store is not None and self._owns_store:
            await self._store.close()
            self._store = None


def alipay_clients(settings: Settings, session: aiohttp.ClientSession, *,
                   timeout: float = APPLY_TOKEN_TIMEOUT_SECONDS) -> dict[str, AlipayClient]:
    return {name: AlipayClient(config, session, timeout=timeout) for name, config in settings.providers().items()}
