"""The ``token-created`` worker: records the tokens a TOKEN_CREATED notification carries.

Contract sections 1 and 5. Alipay+ sends the tokens, their expiry times, scopes and the customer; AMS sends
the access token and who it belongs to (its ``userId`` is the wallet's id of the user: our ``customerId``).
The store decides, idempotently, whether ``authorization.activated`` is to be emitted: once per
authorization, again only when this message may have been seen before (so a lost publish is repaired), and
never for an authorization already canceled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from authnotify.domain.events import MerchantEvent
from authnotify.store import Store, TokenGrant
from authnotify.messaging.topology import Consumer
from authnotify.alipay.notifications import (
    AmsTokenCreated,
    ApsTokenCreated,
    TokenCreated,
    notification_parser,
)
from authnotify.messaging.consumer import MessageContext, WorkerSpec, annotate

if TYPE_CHECKING:
    from authnotify.workers.resources import Resources


NOTIFY_TYPE = "TOKEN_CREATED"


def token_grant(notification: TokenCreated) -> TokenGrant:
    """What the notification tells the store, field by field from the provider's model."""
    if isinstance(notification, ApsTokenCreated):
        return TokenGrant(
            provider="aps",
            access_token=notification.accessToken,
            refresh_token=notification.refreshToken,
            access_token_expiry_time=notification.accessTokenExpiryTime,
            refresh_token_expiry_time=notification.refreshTokenExpiryTime,
            auth_client_id=notification.authClientId,
            reference_merchant_id=notification.referenceMerchantId,
            reference_agreement_id=notification.referenceAgreementId,
            customer_id=notification.customerId,
            user_login_id=notification.userLoginId,
            auth_state=notification.authState,
            scopes=list(notification.scopes) if notification.scopes is not None else None,
        )
    assert isinstance(notification, AmsTokenCreated)
    return TokenGrant(
        provider="ams",
        access_token=notification.accessToken,
        auth_client_id=notification.authClientId,
        customer_id=notification.userId,
        user_login_id=notification.userLoginId,
        auth_state=notification.authState,
    )


async def handle_token_created(
    notification: TokenCreated, context: MessageContext, *, store: Store
) -> list[MerchantEvent]:
    recorded = await store.record_tokens(
        token_grant(notification), possibly_seen_before=context.possibly_seen_before
    )
    authorization = recorded.authorization
    annotate(provider=authorization.provider, fingerprint=authorization.accessTokenFingerprint,
             status=authorization.status, emitted=[event.type for event in recorded.events])
    return recorded.events


parse_token_created = notification_parser(NOTIFY_TYPE)


async def worker_spec(resources: Resources) -> WorkerSpec:
    store = await resources.store()

    async def handle(notification: TokenCreated, context: MessageContext) -> list[MerchantEvent]:
        return await handle_token_created(notification, context, store=store)

    return WorkerSpec(consumer=Consumer.TOKEN_CREATED, parse=parse_token_created, handle=handle)
