"""Merchant events (contract section 6): the ``data`` object of an authorization and the event envelope.

The same :class:`AuthorizationData` is what ``authorizations list --json`` prints. An event's id, its
``webhook-id``, is derived from (provider, accessTokenFingerprint, type), so every redelivery, retry and
replay of the same event carries the same id and a merchant can deduplicate on it.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict

EventType = Literal["authorization.activated", "authorization.canceled"]
EVENT_TYPES: tuple[EventType, ...] = ("authorization.activated", "authorization.canceled")


def access_token_fingerprint(access_token: str) -> str:
    """The name of an authorization wherever one is needed: 16 hex digits of SHA-256 of the token."""
    return hashlib.sha256(access_token.encode("utf-8")).hexdigest()[:16]


def iso_utc(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class AuthorizationData(BaseModel):
    """Everything known about an authorization, never a raw token. Unknown fields are null."""

    model_config = ConfigDict(frozen=True)

    provider: Literal["ams", "aps"]
    status: Literal["active", "canceled"]
    accessTokenFingerprint: str
    authClientId: str | None = None
    referenceMerchantId: str | None = None
    referenceAgreementId: str | None = None
    customerId: str | None = None
    userLoginId: str | None = None
    authState: str | None = None
    scopes: list[str] | None = None
    accessTokenExpiryTime: str | None = None
    refreshTokenExpiryTime: str | None = None
    canceledAt: str | None = None
    tokenCancelSource: str | None = None
    reason: str | None = None


def webhook_id(provider: str, fingerprint: str, event_type: str) -> str:
    digest = hashlib.sha256(f"{provider}:{fingerprint}:{event_type}".encode()).hexdigest()[:32]
    return f"msg_{digest}"


class MerchantEvent(BaseModel):
    """What is POSTed to the merchant, byte for byte the body of a ``{ns}.merchant-events`` message."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: EventType
    createdAt: str
    data: AuthorizationData

    @classmethod
    def of(cls, event_type: EventType, data: AuthorizationData, created_at: datetime) -> MerchantEvent:
        return cls(
            id=webhook_id(data.provider, data.accessTokenFingerprint, event_type),
            type=event_type,
            createdAt=iso_utc(created_at) or "",
            data=data,
        )

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))
