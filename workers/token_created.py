"""The ``token-created`` consumer: records the tokens a TOKEN_CREATED notification carries.

Alipay+ sends the tokens, their expiry times, scopes and the customer; AMS sends
the access token and who it belongs to (its ``userId`` is the wallet's id of the user: our ``customerId``).
``authorization.activated`` is emitted by the domain's event rules: once per authorization, again only when
this message may have been seen before (so a lost publish is repaired), never for a canceled one.
"""

from __future__ import annotations

from authnotify.alipay.notifications import (
    TOKEN_CREATED,
    AmsTokenCreated,
    ApsTokenCreated,
    TokenCreated,
    parse_notification,
)
from authnotify.domain.authorizations import TokenGrant
from authnotify.domain.events import MerchantEvent, activation_events
from authnotify.messaging.consumer import ConsumerSpec, MessageContext
from authnotify.messaging.topology import Consumer
from authnotify.observability.logging import annotate
from authnotify.store import AuthorizationStore
from authnotify.workers.resources import Resources


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


def parse_token_created(body: bytes, context: MessageContext) -> TokenCreated:
    model: TokenCreated = parse_notification(body, context.provider, TOKEN_CREATED)
    return model


async def handle_token_created(
    notification: TokenCreated, context: MessageContext, *, store: AuthorizationStore
) -> list[MerchantEvent]:
    transition = await store.record_tokens(token_grant(notification))
    events = activation_events(transition, possibly_seen_before=context.possibly_seen_before)
    authorization = transition.authorization
    annotate(provider=authorization.provider, fingerprint=authorization.accessTokenFingerprint,
             status=authorization.status, emitted=[event.type for event in events])
    return events


async def consumer(resources: Resources) -> ConsumerSpec:
    store = await resources.store()

    async def handle(notification: TokenCreated, context: MessageContext) -> list[MerchantEvent]:
        return await handle_token_created(notification, context, store=store)

    return ConsumerSpec(consumer=Consumer.TOKEN_CREATED, parse=parse_token_created, handle=handle)
