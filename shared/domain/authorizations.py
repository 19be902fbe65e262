"""Authorizations as the rest of the system sees them: never a raw token, always named by a fingerprint.

:class:`AuthorizationData` is the ``data`` object of every merchant event and what ``authorizations list
--json`` prints. :class:`TokenGrant` and :class:`Cancellation` are what notifications and ``applyToken``
tell us; :class:`Transition` is what recording one did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

STATUS_ACTIVE = "active"
STATUS_CANCELED = "canceled"
Status = Literal["active", "canceled"]


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
    """Everything known about an authorization, never a raw token. Unknown fields are null."""

    model_config = ConfigDict(frozen=True)

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
    """What recording a grant or a cancellation did to the authorization.

    ``changed``: this write created the authorization (a grant) or canceled it (a cancellation); false
    when the authorization was already in that state, so the write only filled in what was missing.
    ``since``: when the authorization entered its current status, the ``createdAt`` of its event.
    """

    authorization: AuthorizationData
    changed: bool
    since: datetime
