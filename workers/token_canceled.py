"""The ``token-canceled`` consumer: marks an authorization canceled and tells the merchant.

The event carries everything known from the earlier TOKEN_CREATED
(referenceAgreementId, customer, scopes...), filled in by the store. A cancellation that arrives before its
TOKEN_CREATED leaves a canceled tombstone, so the late TOKEN_CREATED never activates it.
"""

from __future__ import annotations

from authnotify.alipay.notifications import (
    TOKEN_CANCELED,
    AmsTokenCanceled,
    ApsTokenCanceled,
    TokenCanceled,
    parse_notification,
)
from authnotify.domain.authorizations import Cancellation
from authnotify.domain.events import MerchantEvent, cancellation_events
from authnotify.messaging.consumer import ConsumerSpec, MessageContext
from authnotify.messaging.topology import Consumer
from authnotify.observability.logging import annotate
from authnotify.store import AuthorizationStore
from authnotify.workers.resources import Resources


def cancellation(notification: TokenCanceled) -> Cancellation:
    if isinstance(notification, ApsTokenCanceled):
        return Cancellation(
            provider="aps",
            access_token=notification.accessToken,
            auth_client_id=notification.authClientId,
            reference_merchant_id=notification.referenceMerchantId,
            token_cancel_source=notification.tokenCancelSource,
            reason=notification.reason,
            user_login_id=notification.userLoginId,
        )
    assert isinstance(notification, AmsTokenCanceled)
    return Cancellation(
        provider="ams",
        access_token=notification.accessToken,
        auth_client_id=notification.authClientId,
        reason=notification.reason,
        user_login_id=notification.userLoginId,
    )


def parse_token_canceled(body: bytes, context: MessageContext) -> TokenCanceled:
    model: TokenCanceled = parse_notification(body, context.provider, TOKEN_CANCELED)
    return model


async def handle_token_canceled(
    notification: TokenCanceled, context: MessageContext, *, store: AuthorizationStore
) -> list[MerchantEvent]:
    transition = await store.record_cancellation(cancellation(notification))
    events = cancellation_events(transition, possibly_seen_before=context.possibly_seen_before)
    authorization = transition.authorization
    annotate(provider=authorization.provider, fingerprint=authorization.accessTokenFingerprint,
             status=authorization.status, emitted=[event.type for event in events])
    return events


async def consumer(resources: Resources) -> ConsumerSpec:
    store = await resources.store()

    async def handle(notification: TokenCanceled, context: MessageContext) -> list[MerchantEvent]:
        return await handle_token_canceled(notification, context, store=store)

    return ConsumerSpec(consumer=Consumer.TOKEN_CANCELED, parse=parse_token_canceled, handle=handle)
