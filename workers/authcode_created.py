"""The ``authcode-created`` consumer: exchanges an AUTHCODE_CREATED notification's auth code for tokens.

An auth code is exchanged once: the store keeps an exchange record keyed by a
hash of (provider, code), written in the same transaction as the authorization. A notification whose code
was already exchanged (Alipay's redelivery, a retry, a replay) never reaches Alipay again; it re-emits
``authorization.activated`` only under the store's event rules (when this very message may have been
handled before, so an event lost between commit and publish is repaired).

applyToken outcomes: S stores the tokens and emits what the store decides; F dead-letters with the result
code; U, HTTP 5xx, timeouts, connection errors and answers that do not verify are retried.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import aiohttp

from authnotify.alipay.client import APPLY_TOKEN_TIMEOUT_SECONDS, AlipayClient, AlipayUnavailable, ApplyTokenResult
from authnotify.alipay.notifications import (
    AUTHCODE_CREATED,
    AmsAuthCodeCreated,
    ApsAuthCodeCreated,
    AuthCodeCreated,
    parse_notification,
)
from authnotify.config import ENV_PREFIX, Settings
from authnotify.domain.authorizations import AuthorizationData, TokenGrant
from authnotify.domain.events import MerchantEvent, activation_events
from authnotify.errors import PermanentError, TransientError
from authnotify.messaging.consumer import ConsumerSpec, MessageContext
from authnotify.messaging.topology import Consumer
from authnotify.observability.logging import annotate, get_logger
from authnotify.store import AuthorizationStore
from authnotify.workers.resources import Resources

log = get_logger("authnotify.authcode_created")


class _CodeLocks:
    """One lock per auth code in this process, so copies handled at once call applyToken once.

    Keyed by a hash, so no raw code sits in memory longer than its message; entries go when unused.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, provider: str, auth_code: str) -> AsyncIterator[None]:
        key = hashlib.sha256(f"{provider}\x00{auth_code}".encode()).hexdigest()
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


_code_locks = _CodeLocks()


def alipay_clients(settings: Settings, session: aiohttp.ClientSession, *,
                   timeout: float = APPLY_TOKEN_TIMEOUT_SECONDS) -> dict[str, AlipayClient]:
    """A client per configured provider; ConfigError (one line) when AMS lacks customerBelongsTo."""
    return {name: AlipayClient(config, session, timeout=timeout)
            for name, config in settings.providers().items()}


def token_grant(notification: AuthCodeCreated, result: ApplyTokenResult) -> TokenGrant:
    """The applyToken answer, completed by what the notification knows about the authorization."""
    assert result.access_token is not None
    if isinstance(notification, ApsAuthCodeCreated):
        return TokenGrant(
            provider="aps",
            access_token=result.access_token,
            refresh_token=result.refresh_token,
            access_token_expiry_time=result.access_token_expiry_time,
            refresh_token_expiry_time=result.refresh_token_expiry_time,
            auth_client_id=notification.authClientId,
            reference_merchant_id=notification.referenceMerchantId,
            reference_agreement_id=notification.referenceAgreementId,
            customer_id=result.customer_id or notification.customerId,
            user_login_id=result.user_login_id or notification.userLoginId,
            auth_state=notification.authState,
        )
    assert isinstance(notification, AmsAuthCodeCreated)
    return TokenGrant(
        provider="ams",
        access_token=result.access_token,
        refresh_token=result.refresh_token,
        access_token_expiry_time=result.access_token_expiry_time,
        refresh_token_expiry_time=result.refresh_token_expiry_time,
        auth_client_id=notification.authClientId,
        # AMS names the wallet's user id userId in the notification, pspCustomerId in applyToken.
        customer_id=result.customer_id or notification.userId,
        user_login_id=result.user_login_id or notification.userLoginId,
        auth_state=notification.authState,
    )


async def _already_exchanged(
    store: AuthorizationStore, notification: AuthCodeCreated, context: MessageContext, existing: AuthorizationData
) -> list[MerchantEvent]:
    """The code was exchanged before: no second applyToken, events as the store's rules say."""
    annotate(code_exchange="already exchanged", provider=existing.provider,
             fingerprint=existing.accessTokenFingerprint, status=existing.status)
    if not context.possibly_seen_before:
        # A fresh copy (Alipay's redelivery): the message that exchanged the code emitted the event.
        return []
    # This message may have committed and died before its event was published: record the same row
    # again, so the event rules re-emit the identical event.
    tokens = await store.tokens_of(existing.provider, existing.accessTokenFingerprint)
    if tokens is None:
        log.warning("authcode_exchange_without_tokens", fingerprint=existing.accessTokenFingerprint)
        return []
    # Fields a grant leaves out are kept by the store: the access token alone names the row.
    grant = TokenGrant(provider=existing.provider, access_token=tokens[0])
    transition = await store.record_code_exchange(existing.provider, notification.authCode, grant)
    return activation_events(transition, possibly_seen_before=True)


async def handle_authcode_created(
    notification: AuthCodeCreated,
    context: MessageContext,
    *,
    store: AuthorizationStore,
    alipay_clients: Mapping[str, AlipayClient],
) -> list[MerchantEvent]:
    provider = notification.provider
    client = alipay_clients.get(provider)
    if client is None:
        raise PermanentError(
            f"{provider} is not configured ({ENV_PREFIX}{provider.upper()}_CLIENT_ID is not set): "
            "cannot call applyToken"
        )
    auth_code = notification.authCode
    async with _code_locks.hold(provider, auth_code):
        existing = await store.find_code_exchange(provider, auth_code)
        if existing is not None:
            return await _already_exchanged(store, notification, context, existing)

        try:
            result = await client.apply_token(
                auth_code=auth_code,
                auth_client_id=notification.authClientId,
                reference_merchant_id=getattr(notification, "referenceMerchantId", None),
            )
        except AlipayUnavailable as exc:
            raise TransientError(str(exc)) from None

        if result.result_status == "U":
            raise TransientError(f"applyToken answered U {result.result_code}")
        if result.result_status == "F":
            # Another worker process may have exchanged this code meanwhile (a single-use code then
            # answers F): that is a duplicate, not a failure.
            existing = await store.find_code_exchange(provider, auth_code)
            if existing is not None:
                return await _already_exchanged(store, notification, context, existing)
            raise PermanentError(f"applyToken answered F {result.result_code}")

        transition = await store.record_code_exchange(provider, auth_code, token_grant(notification, result))
    events = activation_events(transition, possibly_seen_before=context.possibly_seen_before)
    authorization = transition.authorization
    annotate(code_exchange="exchanged", provider=provider, fingerprint=authorization.accessTokenFingerprint,
             status=authorization.status, emitted=[event.type for event in events])
    return events


def parse_authcode_created(body: bytes, context: MessageContext) -> AuthCodeCreated:
    model: AuthCodeCreated = parse_notification(body, context.provider, AUTHCODE_CREATED)
    return model


async def consumer(resources: Resources, *,
                   apply_token_timeout: float = APPLY_TOKEN_TIMEOUT_SECONDS) -> ConsumerSpec:
    # Clients first: a configuration error stops the start before the database is opened.
    clients = alipay_clients(resources.settings, await resources.http(), timeout=apply_token_timeout)
    store = await resources.store()

    async def handle(notification: AuthCodeCreated, context: MessageContext) -> list[MerchantEvent]:
        return await handle_authcode_created(notification, context, store=store, alipay_clients=clients)

    return ConsumerSpec(consumer=Consumer.AUTHCODE_CREATED, parse=parse_authcode_created, handle=handle)
