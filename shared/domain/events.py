"""Merchant events: the envelope POSTed to merchants, its id, and the rules that say when one is due.

An event's id, its ``webhook-id``, is derived from (provider, the token it is about, type), so every
redelivery, retry and replay of the same event carries the same id and a merchant can deduplicate on it:

* ``authorization.activated``: the authorization's first access token (the ids of authorizations made
  before refresh existed are unchanged);
* ``authorization.refreshed``: the new access token, so a second refresh is a new event;
* ``authorization.canceled`` and ``authorization.expired``: the access token held when it ended;
* ``authorization.expiring``: the token that keeps it alive, named by the authorization and that token's
  expiry time (a refresh token is never fingerprinted; a new one comes with a new expiry time).

The rules make processing idempotent: an event is emitted when a write changed the authorization, and
emitted again (byte for byte the same) only when the message may have been handled before, so an event
lost between the commit and its publish is repaired, never doubled by a fresh duplicate. An authorization's
history is derived from what the store keeps (its times and its tokens), with the same ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict

from authnotify.domain.authorizations import (
    STATUS_ACTIVE,
    STATUS_CANCELED,
    STATUS_EXPIRED,
    AuthorizationData,
    Transition,
    iso_utc,
)

EventType = Literal["authorization.activated", "authorization.refreshed", "authorization.expiring",
                    "authorization.expired", "authorization.canceled"]
ACTIVATED: EventType = "authorization.activated"
REFRESHED: EventType = "authorization.refreshed"
EXPIRING: EventType = "authorization.expiring"
EXPIRED: EventType = "authorization.expired"
CANCELED: EventType = "authorization.canceled"
EVENT_TYPES: tuple[EventType, ...] = (ACTIVATED, REFRESHED, EXPIRING, EXPIRED, CANCELED)


def webhook_id(provider: str, subject: str, event_type: str) -> str:
    """``subject`` is the fingerprint of the token the event is about (see the module docstring)."""
    digest = hashlib.sha256(f"{provider}:{subject}:{event_type}".encode()).hexdigest()[:32]
    return f"msg_{digest}"


def expiring_subject(authorization_id: str, expires_at: datetime) -> str:
    """What names an expiry warning: the authorization and the expiry time of the token it warns about."""
    return f"{authorization_id}@{iso_utc(expires_at)}"


class MerchantEvent(BaseModel):
    """What is POSTed to the merchant, byte for byte the body of a ``{ns}.merchant-events`` message."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: EventType
    createdAt: str
    data: AuthorizationData

    @classmethod
    def of(cls, event_type: EventType, data: AuthorizationData, created_at: datetime,
           subject: str | None = None) -> MerchantEvent:
        return cls(
            id=webhook_id(data.provider, subject or data.accessTokenFingerprint, event_type),
            type=event_type,
            createdAt=iso_utc(created_at) or "",
            data=data,
        )

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


def _due(transition: Transition, possibly_seen_before: bool) -> bool:
    return transition.changed or possibly_seen_before


def activation_events(transition: Transition, *, possibly_seen_before: bool) -> list[MerchantEvent]:
    """``authorization.activated`` for a new authorization; never for one that is no longer active."""
    if transition.authorization.status != STATUS_ACTIVE or not _due(transition, possibly_seen_before):
        return []
    return [MerchantEvent.of(ACTIVATED, transition.authorization, transition.since, transition.token_fingerprint)]


def cancellation_events(transition: Transition, *, possibly_seen_before: bool) -> list[MerchantEvent]:
    """``authorization.canceled`` when this cancellation canceled it (a tombstone included)."""
    if transition.authorization.status != STATUS_CANCELED or not _due(transition, possibly_seen_before):
        return []
    return [MerchantEvent.of(CANCELED, transition.authorization, transition.since, transition.token_fingerprint)]


def refresh_events(transition: Transition, *, possibly_seen_before: bool) -> list[MerchantEvent]:
    """``authorization.refreshed`` for the token this refresh obtained."""
    if not _due(transition, possibly_seen_before):
        return []
    return [MerchantEvent.of(REFRESHED, transition.authorization, transition.since, transition.token_fingerprint)]


def expiry_events(transition: Transition, *, possibly_seen_before: bool) -> list[MerchantEvent]:
    """``authorization.expired``, once: the status changes once, whatever the redeliveries."""
    if transition.authorization.status != STATUS_EXPIRED or not _due(transition, possibly_seen_before):
        return []
    return [MerchantEvent.of(EXPIRED, transition.authorization, transition.since, transition.token_fingerprint)]


def expiring_event(data: AuthorizationData, *, expires_at: datetime, warned_at: datetime) -> MerchantEvent:
    """``authorization.expiring`` for the token that keeps ``data`` alive and expires at ``expires_at``."""
    assert data.authorizationId is not None
    return MerchantEvent.of(EXPIRING, data, warned_at, expiring_subject(data.authorizationId, expires_at))


# --- history: the events of one authorization, derived from what the store keeps ------------------------


@dataclass(frozen=True)
class HeldToken:
    """An access token the authorization held (by fingerprint), from when it was recorded."""

    fingerprint: str
    recorded_at: datetime


@dataclass(frozen=True)
class Timeline:
    """What the store keeps about an authorization's life; its history is derived from it."""

    authorization: AuthorizationData
    tokens: Sequence[HeldToken]  # oldest first: the first one activated it, each later one is a refresh
    activated_at: datetime | None  # None: it was canceled before its tokens were recorded
    expiry_warned_for: datetime | None  # the expiry time an expiry warning was sent for
    expiry_warned_at: datetime | None
    ended_at: datetime | None  # canceled or expired at


class HistoryEntry(BaseModel):
    """One event of an authorization's history: its webhook-id, type, time and the token it is about."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: EventType
    createdAt: str
    accessTokenFingerprint: str | None  # None for a warning: it is about the token that keeps it alive


def history(timeline: Timeline) -> list[HistoryEntry]:
    """The authorization's events, oldest first, with the ids its merchant events carry."""
    data = timeline.authorization
    entries: list[tuple[datetime, int, HistoryEntry]] = []

    def add(event_type: EventType, at: datetime, fingerprint: str | None, subject: str | None = None) -> None:
        entry = HistoryEntry(id=webhook_id(data.provider, subject or fingerprint or "", event_type), type=event_type,
                             createdAt=iso_utc(at) or "", accessTokenFingerprint=fingerprint)
        entries.append((at, len(entries), entry))

    tokens = list(timeline.tokens)
    if tokens and timeline.activated_at is not None:
        add(ACTIVATED, timeline.activated_at, tokens[0].fingerprint)
    for token in tokens[1:]:
        add(REFRESHED, token.recorded_at, token.fingerprint)
    if timeline.expiry_warned_for is not None and timeline.expiry_warned_at is not None and data.authorizationId:
        add(EXPIRING, timeline.expiry_warned_at, None, expiring_subject(data.authorizationId, timeline.expiry_warned_for))
    if timeline.ended_at is not None and data.status == STATUS_EXPIRED:
        add(EXPIRED, timeline.ended_at, data.accessTokenFingerprint)
    if timeline.ended_at is not None and data.status == STATUS_CANCELED:
        add(CANCELED, timeline.ended_at, data.accessTokenFingerprint)
    return [entry for _, _, entry in sorted(entries, key=lambda item: (item[0], item[1]))]
