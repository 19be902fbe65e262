"""The store's interface: what the handlers and the commands may ask of it, whatever keeps the data.

:class:`~authnotify.store.sql.SqlStore` keeps it in SQLite or PostgreSQL;
:class:`~authnotify.store.memory.InMemoryStore` keeps it in a dict, for tests of the logic above. Every write
returns the :class:`~authnotify.domain.authorizations.Transition` it made; what is to be emitted about it is
for :mod:`authnotify.domain.events` to say, not for the store.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Protocol

from authnotify.domain.authorizations import AuthorizationData, Cancellation, TokenGrant, Transition, iso_utc

TokenKind = Literal["access", "refresh"]


def authorization_data(row: Any) -> AuthorizationData:
    """A stored row (columns as the schema names them) as the rest of the system sees it: no token."""
    return AuthorizationData(
        provider=row.provider,
        status=row.status,
        accessTokenFingerprint=row.access_token_fingerprint,
        authClientId=row.auth_client_id,
        referenceMerchantId=row.reference_merchant_id,
        referenceAgreementId=row.reference_agreement_id,
        customerId=row.customer_id,
        userLoginId=row.user_login_id,
        authState=row.auth_state,
        scopes=list(row.scopes) if row.scopes is not None else None,
        accessTokenExpiryTime=iso_utc(row.access_token_expires_at),
        refreshTokenExpiryTime=iso_utc(row.refresh_token_expires_at),
        canceledAt=iso_utc(row.canceled_at),
        tokenCancelSource=row.token_cancel_source,
        reason=row.cancel_reason,
    )


class AuthorizationStore(Protocol):
    async def record_tokens(self, grant: TokenGrant) -> Transition:
        """Creates the authorization, or fills in what a known one lacks (its status never changes here)."""
        ...

    async def record_code_exchange(self, provider: str, auth_code: str, grant: TokenGrant) -> Transition:
        """:meth:`record_tokens` plus the record that ``auth_code`` was exchanged, in one transaction."""
        ...

    async def record_cancellation(self, cancel: Cancellation) -> Transition:
        """Cancels the authorization; an unknown one is recorded canceled (a tombstone)."""
        ...

    async def find_code_exchange(self, provider: str, auth_code: str) -> AuthorizationData | None: ...

    async def tokens_of(self, provider: str, fingerprint: str) -> tuple[str, str | None] | None:
        """The decrypted (access token, refresh token); None when unknown."""
        ...

    async def get_authorization(self, key: str) -> AuthorizationData | None:
        """By accessTokenFingerprint or referenceAgreementId."""
        ...

    async def list_authorizations(self, *, status: str | None = None,
                                  merchant: str | None = None) -> list[AuthorizationData]: ...

    async def expiring(self, *, before: datetime, token: TokenKind) -> list[AuthorizationData]: ...

    async def reencrypt_tokens(self) -> int: ...

    async def close(self) -> None: ...
