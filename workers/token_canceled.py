"""The ``token-canceled`` worker: marks an authorization canceled and tells the merchant.

Contract sections 1 and 5. The event carries everything known from the earlier TOKEN_CREATED
(referenceAgreementId, customer, scopes...), filled in by the store. A cancellation that arrives before its
TOKEN_CREATED leaves a canceled tombstone, so the late TOKEN_CREATED never activates it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from authnotify.domain.events import MerchantEvent
from authnotify.store import Cancellation, Store
from authnotify.messaging.topology import Consumer
from authnotify.alipay.notifications import (
    AmsTokenCanceled,
    ApsTokenCanceled,
    TokenCanceled,
    notification_parser,
)
from authnotify.messaging.consumer import MessageContext, WorkerSpec, annotate

if TYPE_CHECKING:
    from authnotify.workers.resources import Resources


NOTIFY_TYPE = "TOKEN_CANCELED"


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


async def handle_token_canceled(
    notification: TokenCanceled, context: MessageContext, *, store: Store
) -> list[MerchantEvent]:
    recorded = await store.record_cancellation(
        cancellation(notification), possibly_seen_before=context.possibly_seen_before
    )
    authorization = recorded.authorization
    annotate(provider=authorization.provider, fingerprint=authorization.accessTokenFingerprint,
             status=authorization.status, emitted=[event.type for event in recorded.events])
    return recorded.events


parse_token_canceled = notification_parser(NOTIFY_TYPE)


async def worker_spec(resources: Resources) -> WorkerSpec:
    store = await resources.store()

    async def handle(notification: TokenCanceled, context: MessageContext) -> list[MerchantEvent]:
        return await handle_token_canceled(notification, context, store=store)

    return WorkerSpec(consumer=Consumer.TOKEN_CANCELED, parse=parse_token_canceled, handle=handle)
