"""The store's interface: what the handlers, the scheduler, the API and the commands may ask of it.

:class:`~authnotify.store.sql.SqlStore` keeps it in SQLite or PostgreSQL;
:class:`~authnotify.store.memory.InMemoryStore` keeps it in a dict, for tests of the logic above. Every write
returns the :class:`~authnotify.domain.authorizations.Transition` it made; what is to be emitted about it is
for :mod:`authnotify.domain.events` to say, not for the store.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from authnotify.domain.authorizations import (
    STATUS_CANCELED,
    STATUS_EXPIRED,
    AuthorizationData,
    Cancellation,
    TokenGrant,
    Transition,
    iso_utc,
)
from authnotify.domain.events import Timeline

TokenKind = Literal["access", "refresh"]
# The windows of the "tokens expiring within" metrics.
EXPIRING_WINDOWS: tuple[tuple[str, timedelta], ...] = (("24h", timedelta(hours=24)), ("7d", timedelta(days=7)))


def authorization_data(row: Any) -> AuthorizationData:
    """A stored row (columns as the schema names them) as the rest of the system sees it: no token."""
    return AuthorizationData(
        authorizationId=row.authorization_id,
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
        reason=row.expiry_reason if row.status == STATUS_EXPIRED else row.cancel_reason,
    )


def ended_at(row: Any) -> datetime | None:
    """When a canceled or expired authorization ended (the createdAt of that event)."""
    if row.status == STATUS_CANCELED:
        return row.canceled_at or row.updated_at
    if row.status == STATUS_EXPIRED:
        return row.expired_at or row.updated_at
    return None


def keepalive_expiry(row: Any) -> datetime | None:
    """The expiry of the token that keeps the authorization alive: its refresh token, else its access token."""
    if row.refresh_token_encrypted is not None:
        return row.refresh_token_expires_at
    return row.access_token_expires_at


# --- what the lifecycle operations return ----------------------------------------------------------------


@dataclass(frozen=True)
class CurrentTokens:
    """An authorization with its decrypted current tokens: for a refresh, a revocation, the API."""

    authorization: AuthorizationData
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    access_token_expires_at: datetime | None
    refresh_token_expires_at: datetime | None

    def refresh_token_expired(self, now: datetime) -> bool:
        return self.refresh_token_expires_at is not None and self.refresh_token_expires_at <= now

    def access_token_expired(self, now: datetime) -> bool:
        return self.access_token_expires_at is not None and self.access_token_expires_at <= now


class ClaimOutcome(enum.StrEnum):
    CLAIMED = "claimed"  # this caller holds the refresh until it records it or releases it
    UNKNOWN = "unknown"  # no such authorization
    ENDED = "ended"  # canceled or expired: nothing to refresh
    MOVED_ON = "moved-on"  # it no longer holds the token the request was about: already refreshed
    BUSY = "busy"  # another worker holds the refresh right now


@dataclass(frozen=True)
class RefreshClaim:
    outcome: ClaimOutcome
    authorization: AuthorizationData | None = None
    tokens: CurrentTokens | None = None  # set when CLAIMED


@dataclass(frozen=True)
class DueWork:
    """What a scheduler pass claimed for one authorization: a refresh request to publish and/or a warning."""

    authorization: AuthorizationData
    claimed_at: datetime
    refresh: bool  # request a refresh (or, when it can no longer be refreshed, its expiry)
    warn_for: datetime | None  # the keep-alive expiry an authorization.expiring is due for


@dataclass(frozen=True)
class DueWorkDone:
    """What of a claimed :class:`DueWork` the broker confirmed."""

    work: DueWork
    refresh_published: bool
    warning_published: bool


@dataclass(frozen=True)
class Schedule:
    """When work is due (docs/lifecycle.md): the scheduler's settings, in one value the store can use."""

    refresh_before: timedelta
    expiry_warning: timedelta
    pending: timedelta  # a refresh request stays pending this long (its retries), then may be repeated
    lease: timedelta  # a scheduler's claim on due work is abandoned after this long (it died meanwhile)


@dataclass(frozen=True)
class LifecycleStats:
    by_status: dict[str, int]
    expiring: dict[tuple[TokenKind, str], int]  # (token kind, window label) -> active authorizations
    oldest_due: datetime | None  # the oldest due time of work not yet published


@dataclass(frozen=True)
class Page:
    items: list[AuthorizationData]
    next_after: tuple[datetime, str] | None  # (created_at, authorizationId) of the last item, when more follow


@dataclass(frozen=True)
class CommandOutcome:
    command_id: str
    kind: str
    authorization_id: str | None
    status: Literal["succeeded", "failed", "retrying"]
    detail: str | None
    attempts: int
    updated_at: datetime


class AuthorizationStore(Protocol):
    # --- what notifications tell us ---------------------------------------------------------------

    async def record_tokens(self, grant: TokenGrant) -> Transition:
        """Creates the authorization, or fills in what a known one lacks (its status never changes here).

        A grant of a token the authorization no longer holds (superseded by a refresh) changes nothing.
        """
        ...

    async def record_code_exchange(self, provider: str, auth_code: str, grant: TokenGrant) -> Transition:
        """:meth:`record_tokens` plus the record that ``auth_code`` was exchanged, in one transaction."""
        ...

    async def record_cancellation(self, cancel: Cancellation) -> Transition:
        """Cancels the authorization that ever held the token; an unknown one is recorded canceled (a tombstone)."""
        ...

    async def find_code_exchange(self, provider: str, auth_code: str) -> AuthorizationData | None: ...

    # --- the lifecycle --------------------------------------------------------------------------------

    async def claim_refresh(self, authorization_id: str, fingerprint: str, *, until: datetime) -> RefreshClaim:
        """Takes the refresh of an active authorization that still holds ``fingerprint``, until ``until``."""
        ...

    async def release_refresh(self, authorization_id: str, *, request_done: bool) -> None:
        """Gives the worker's claim back. ``request_done``: the scheduler's request is answered too (nothing
        more to do for it), so a later due time may be requested again; a failed attempt that will be
        retried keeps the request pending, so the scheduler does not send another meanwhile."""
        ...

    async def record_refresh(self, authorization_id: str, fingerprint: str, grant: TokenGrant) -> Transition:
        """Replaces the token ``fingerprint`` by the grant's (kept in the history); releases the claim."""
        ...

    async def refresh_after(self, authorization_id: str, fingerprint: str) -> Transition | None:
        """The refresh that replaced ``fingerprint``, if there was one (to emit its event again)."""
        ...

    async def record_expiry(self, authorization_id: str, reason: str) -> Transition:
        """Active -> expired (once); releases the claim."""
        ...

    async def cancel_authorization(self, authorization_id: str, *, source: str, reason: str | None) -> Transition:
        """Active -> canceled (a revocation); a canceled or expired one is left as it is."""
        ...

    async def claim_due_work(self, schedule: Schedule, *, limit: int) -> list[DueWork]:
        """Takes up to ``limit`` authorizations with due work no other scheduler holds (lease: ``schedule``)."""
        ...

    async def finish_due_work(self, done: list[DueWorkDone]) -> None:
        """Records what was published and gives the claims back (what failed is due again next pass)."""
        ...

    async def lifecycle_stats(self, schedule: Schedule) -> LifecycleStats: ...

    async def record_command(self, outcome: CommandOutcome) -> None: ...

    async def command(self, command_id: str) -> CommandOutcome | None: ...

    # --- reads ------------------------------------------------------------------------------------------

    async def tokens_of(self, provider: str, fingerprint: str) -> tuple[str, str | None] | None:
        """The decrypted (access token, refresh token) of the authorization that held ``fingerprint``."""
        ...

    async def current_tokens(self, authorization_id: str) -> CurrentTokens | None: ...

    async def get_authorization(self, key: str) -> AuthorizationData | None:
        """By authorizationId, any accessTokenFingerprint it ever held, or referenceAgreementId."""
        ...

    async def timeline(self, authorization_id: str) -> Timeline | None: ...

    async def list_authorizations(self, *, status: str | None = None, merchant: str | None = None,
                                  provider: str | None = None, expiring_before: datetime | None = None) -> list[
                                      AuthorizationData]: ...

    async def page_authorizations(self, *, status: str | None = None, merchant: str | None = None,
                                  provider: str | None = None, expiring_before: datetime | None = None,
                                  after: tuple[datetime, str] | None = None, limit: int = 100) -> Page: ...

    async def expiring(self, *, before: datetime, token: TokenKind) -> list[AuthorizationData]: ...

    async def reencrypt_tokens(self) -> int: ...

    async def close(self) -> None: ...
