"""The ``token-refresh`` consumer: replaces an authorization's access token before it expires, or expires it.

A request (from the scheduler, or from the API on demand) names the authorization and the access token it
was made for. The worker first claims the refresh in the database for a short while, so two workers (or
two copies of the request) never call ``applyToken`` twice for one token; a request whose token was already
replaced is done. Then:

* a refresh token that is still valid goes to ``applyToken`` with grantType ``REFRESH_TOKEN`` and the same
  identifying fields as the code exchange. S stores the new tokens and expiry times (the old fingerprint
  stays in the authorization's history) and emits ``authorization.refreshed``; a signed F expires the
  authorization (``authorization.expired``, once, whatever the redeliveries), except an F that refuses
  our request itself (signature, client, parameters): that is dead-lettered, as it says nothing of the
  token; U, HTTP 5xx, timeouts and answers that do not verify are retried;
* a refresh token past its expiry expires the authorization; so does an access token past its expiry when
  there is no refresh token to get another (until then, there is nothing to do).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from authnotify.alipay.client import AlipayClient, AlipayUnavailable
from authnotify.config import ENV_PREFIX
from authnotify.domain.authorizations import TokenGrant
from authnotify.domain.commands import RefreshRequest
from authnotify.domain.events import MerchantEvent, expiry_events, refresh_events
from authnotify.errors import PermanentError, StoreError, TransientError
from authnotify.messaging.consumer import ConsumerSpec, MessageContext, json_model_parser
from authnotify.messaging.topology import Consumer
from authnotify.observability.logging import annotate
from authnotify.observability.metrics import TOKEN_REFRESHES
from authnotify.store import AuthorizationStore
from authnotify.store.repository import ClaimOutcome, CurrentTokens
from authnotify.workers.resources import Resources

# Longer than applyToken's 5 s timeout and the writes around it; a worker that dies holding a claim
# delays the next attempt by this much at most.
CLAIM_SECONDS = 30.0

# F answers that refuse our request rather than answer about the token: expiring authorizations over them
# would end every authorization the day a key or a client id is misconfigured.
REQUEST_REFUSED_CODES = frozenset({
    "INVALID_SIGNATURE", "INVALID_CLIENT", "KEY_NOT_FOUND", "PARAM_ILLEGAL", "ACCESS_DENIED", "INVALID_API",
    "NO_INTERFACE_DEF", "MEDIA_TYPE_NOT_ACCEPTABLE", "METHOD_NOT_SUPPORTED", "INVALID_AUTH_CLIENT",
    "INVALID_AUTH_CLIENT_STATUS", "CLIENT_INVALID",
})


def _count(provider: str, outcome: str) -> None:
    TOKEN_REFRESHES.labels(provider=provider, outcome=outcome).inc()


async def handle_refresh_request(
    request: RefreshRequest,
    context: MessageContext,
    *,
    store: AuthorizationStore,
    alipay_clients: Mapping[str, AlipayClient],
) -> list[MerchantEvent]:
    authorization_id = request.authorizationId
    now = datetime.now(UTC)
    claim = await store.claim_refresh(authorization_id, request.accessTokenFingerprint,
                                      until=now + timedelta(seconds=CLAIM_SECONDS))
    annotate(authorization_id=authorization_id, fingerprint=request.accessTokenFingerprint,
             claim=claim.outcome.value, origin=request.origin)
    if claim.outcome is ClaimOutcome.UNKNOWN:
        raise PermanentError(f"no authorization {authorization_id}")
    if claim.outcome is ClaimOutcome.BUSY:
        raise TransientError(f"another worker is refreshing {authorization_id}")
    if claim.outcome is ClaimOutcome.ENDED:
        _count(request.provider, "skipped")
        if not context.possibly_seen_before:
            return []
        # This very request may have expired it and died before its event was published.
        return expiry_events(await store.record_expiry(authorization_id, "unchanged"), possibly_seen_before=True)
    if claim.outcome is ClaimOutcome.MOVED_ON:
        _count(request.provider, "skipped")
        if not context.possibly_seen_before:
            return []
        replaced = await store.refresh_after(authorization_id, request.accessTokenFingerprint)
        return refresh_events(replaced, possibly_seen_before=True) if replaced is not None else []

    assert claim.tokens is not None
    try:
        return await _refresh(claim.tokens, request, context, store=store, alipay_clients=alipay_clients, now=now)
    except BaseException:
        # The claim goes back at once (else in CLAIM_SECONDS), so the retry can take it; the request stays
        # pending (the scheduler sends no other while this one is being retried).
        with contextlib.suppress(StoreError):
            await store.release_refresh(authorization_id, request_done=False)
        raise


async def _refresh(tokens: CurrentTokens, request: RefreshRequest, context: MessageContext, *,
                   store: AuthorizationStore, alipay_clients: Mapping[str, AlipayClient],
                   now: datetime) -> list[MerchantEvent]:
    data = tokens.authorization
    authorization_id = request.authorizationId

    async def expire(reason: str) -> list[MerchantEvent]:
        transition = await store.record_expiry(authorization_id, reason)
        _count(data.provider, "expired")
        annotate(outcome="expired", reason=reason)
        return expiry_events(transition, possibly_seen_before=context.possibly_seen_before)

    if tokens.refresh_token is None:
        if tokens.access_token_expired(now):
            return await expire("the access token expired and there is no refresh token")
        await store.release_refresh(authorization_id, request_done=True)
        _count(data.provider, "skipped")
        return []
    if tokens.refresh_token_expired(now):
        return await expire("the refresh token expired")

    client = alipay_clients.get(data.provider)
    if client is None:
        raise PermanentError(f"{data.provider} is not configured ({ENV_PREFIX}{data.provider.upper()}_CLIENT_ID is "
                             "not set): cannot call applyToken")
    if data.provider == "aps" and not data.authClientId:
        raise PermanentError("the authorization has no authClientId, which Alipay+ applyToken needs")
    try:
        result = await client.apply_token(refresh_token=tokens.refresh_token, auth_client_id=data.authClientId,
                                          reference_merchant_id=data.referenceMerchantId)
    except AlipayUnavailable as exc:
        _count(data.provider, "retried")
        raise TransientError(str(exc)) from None
    if result.result_status == "U":
        _count(data.provider, "retried")
        raise TransientError(f"applyToken (refresh) answered U {result.result_code}")
    if result.result_status == "F":
        if result.result_code in REQUEST_REFUSED_CODES:
            _count(data.provider, "failed")
            raise PermanentError(f"applyToken (refresh) answered F {result.result_code}: Alipay refused the request, "
                                 "not the token")
        return await expire(f"the refresh was refused: applyToken answered F {result.result_code}")

    assert result.access_token is not None
    grant = TokenGrant(
        provider=data.provider,
        access_token=result.access_token,
        refresh_token=result.refresh_token,
        access_token_expiry_time=result.access_token_expiry_time,
        refresh_token_expiry_time=result.refresh_token_expiry_time,
        customer_id=result.customer_id,
        user_login_id=result.user_login_id,
    )
    transition = await store.record_refresh(authorization_id, request.accessTokenFingerprint, grant)
    _count(data.provider, "refreshed" if transition.changed else "skipped")
    annotate(outcome="refreshed" if transition.changed else "unchanged", new_fingerprint=grant.fingerprint)
    return refresh_events(transition, possibly_seen_before=context.possibly_seen_before)


parse_refresh_request = json_model_parser(RefreshRequest, "a refresh request")


async def consumer(resources: Resources) -> ConsumerSpec:
    # Clients first: a configuration error stops the start before the database is opened.
    clients = await resources.alipay_clients()
    store = await resources.store()

    async def handle(request: RefreshRequest, context: MessageContext) -> list[MerchantEvent]:
        return await handle_refresh_request(request, context, store=store, alipay_clients=clients)

    return ConsumerSpec(consumer=Consumer.TOKEN_REFRESH, parse=parse_refresh_request, handle=handle)
