"""Authorizations as the rest of the system sees them: never a raw token, named by an id and fingerprints.

:class:`AuthorizationData` is the ``data`` object of every merchant event and what ``authorizations list
--json`` prints. :class:`TokenGrant` and :class:`Cancellation` are what notifications and ``applyToken``
tell us; :class:`Transition` is what recording one did.

An authorization is ``auth_...`` (its ``authorizationId``) for life; its access token changes with every
refresh, and every fingerprint it ever held keeps naming it (``docs/lifecycle.md``).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

STATUS_ACTIVE = "active"
STATUS_CANCELED = "canceled"
STATUS_EXPIRED = "expired"
Status = Literal["active", "canceled", "expired"]
STATUSES: tuple[str, ...] = (STATUS_ACTIVE, STATUS_CANCELED, STATUS_EXPIRED)

AUTHORIZATION_ID_PREFIX = "auth_"
AUTHORIZATION_ID_MAX_LENGTH = 40


def new_authorization_id() -> str:
    """``auth_`` and 22 URL-safe characters (128 random bits): never reused, never guessable."""
    return AUTHORIZATION_ID_PREFIX + secrets.token_urlsafe(16)


def is_authorization_id(key: str) -> bool:
    return key.startswith(AUTHORIZATION_ID_PREFIX) and len(key) <= AUTHORIZATION_ID_MAX_LENGTH


def access_token_fingerprint(access_token: str) -> str:
    """The name of an authorization wherever one is needed: 16 hex digits of SHA-256 of the token."""
    return hashlib.sha256(access_token.encode("utf-8")).hexdigest()[:16]


def code_hash(provider: str, auth_code: str) -> str:
    """Names an exchanged auth code without keeping it: codes are single-use, high-entropy strings."""
    return hashlib.sha256(f"{provider}\n{auth_code}".encode()).hexdigest()


def iso_utc(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class AuthorizationData(BaseModel):
    """Everything known about an authorization, never a raw token. Unknown fields are null.

    ``authorizationId`` is always set by the store; it is optional here only so that events published
    before authorization ids existed (still queued, retried or dead-lettered) remain readable. ``reason``
    is why the authorization ended: the cancellation's reason, or why it expired.
    """

    model_config = ConfigDict(frozen=True)

    authorizationId: str | None = None
    provider: Literal["ams", "aps"]
    status: Status
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


@dataclass(frozen=True)
class TokenGrant:
    """What TOKEN_CREATED or a successful applyToken gives us."""

    provider: str
    access_token: str
    refresh_token: str | None = None
    access_token_expiry_time: datetime | None = None
    refresh_token_expiry_time: datetime | None = None
    auth_client_id: str | None = None
    reference_merchant_id: str | None = None
    reference_agreement_id: str | None = None
    customer_id: str | None = None
    user_login_id: str | None = None
    auth_state: str | None = None
    scopes: list[str] | None = None

    @property
    def fingerprint(self) -> str:
        return access_token_fingerprint(self.access_token)

    def __repr__(self) -> str:  # never a raw token in a log line or a traceback
        return f"TokenGrant(provider={self.provider!r}, accessTokenFingerprint={self.fingerprint!r})"


@dataclass(frozen=True)
class Cancellation:
    """What TOKEN_CANCELED gives us."""

    provider: str
    access_token: str
    auth_client_id: str | None = None
    reference_merchant_id: str | None = None
    token_cancel_source: str | None = None
    reason: str | None = None
    user_login_id: str | None = None

    @property
    def fingerprint(self) -> str:
        return access_token_fingerprint(self.access_token)

    def __repr__(self) -> str:
        return f"Cancellation(provider={self.provider!r}, accessTokenFingerprint={self.fingerprint!r})"


@dataclass(frozen=True)
class Transition:
    """What a write did to the authorization.

    ``changed``: this write made the change it was asked for (created, canceled, refreshed, expired);
    false when the authorization was already past it, so the write at most filled in what was missing.
    ``since``: when that change happened, the ``createdAt`` of its event.
    ``fingerprint``: the access token the change is about (the first token for an activation, the new one
    for a refresh, the one held when it was canceled or expired): it names the event.
    """

    authorization: AuthorizationData
    changed: bool
    since: datetime
    fingerprint: str = ""

    @property
    def token_fingerprint(self) -> str:
        return self.fingerprint or self.authorization.accessTokenFingerprint
