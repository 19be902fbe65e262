"""Merchant events: the envelope POSTed to merchants, its id, and the rules that say when one is due.

An event's id, its ``webhook-id``, is derived from (provider, accessTokenFingerprint, type), so every
redelivery, retry and replay of the same event carries the same id and a merchant can deduplicate on it.
The rules make processing idempotent: an event is emitted when a write changed the authorization, and
emitted again (byte for byte the same) only when the message may have been handled before, so an event
lost between the commit and its publish is repaired, never doubled by a fresh duplicate.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict

from authnotify.domain.authorizations import STATUS_ACTIVE, AuthorizationData, Transition, iso_utc

EventType = Literal["authorization.activated", "authorization.canceled"]
ACTIVATED: EventType = "authorization.activated"
CANCELED: EventType = "authorization.canceled"
EVENT_TYPES: tuple[EventType, ...] = (ACTIVATED, CANCELED)


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


def activation_events(transition: Transition, *, possibly_seen_before: bool) -> list[MerchantEvent]:
    """``authorization.activated`` for a new authorization; never for a canceled one."""
    if transition.authorization.status != STATUS_ACTIVE:
        return []
    if transition.changed or possibly_seen_before:
        return [MerchantEvent.of(ACTIVATED, transition.authorization, transition.since)]
    return []


def cancellation_events(transition: Transition, *, possibly_seen_before: bool) -> list[MerchantEvent]:
    """``authorization.canceled`` when this cancellation canceled it (a tombstone included)."""
    if transition.changed or possibly_seen_before:
        return [MerchantEvent.of(CANCELED, transition.authorization, transition.since)]
    return []
