"""An in-memory :class:`~authnotify.store.repository.AuthorizationStore`, for tests of the logic above it.

It follows the same rules as the SQL store (a new grant is active, a known one is only filled in, a
cancellation of an unknown authorization leaves a canceled tombstone, rows only go active -> canceled, codes
are kept as hashes) so handler tests run in milliseconds. Tokens are kept in clear here: it never leaves
the test's process. What only a database can show (transactions, migrations, concurrent writers,
encryption at rest) stays in the tests that use SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from authnotify.domain.authorizations import (
    STATUS_ACTIVE,
    STATUS_CANCELED,
    AuthorizationData,
    Cancellation,
    TokenGrant,
    Transition,
    code_hash,
)
from authnotify.errors import StoreError
from authnotify.store.repository import TokenKind, authorization_data


@dataclass(frozen=True)
class _Row:
    """A row with the SQL schema's column names, so it reads like one."""

    provider: str
    access_token_fingerprint: str
    status: str
    access_token: str
    created_at: datetime
    refresh_token: str | None = None
    access_token_expires_at: datetime | None = None
    refresh_token_expires_at: datetime | None = None
    auth_client_id: str | None = None
    reference_merchant_id: str | None = None
    reference_agreement_id: str | None = None
    customer_id: str | None = None
    user_login_id: str | None = None
    auth_state: str | None = None
    scopes: tuple[str, ...] | None = None
    token_cancel_source: str | None = None
    cancel_reason: str | None = None
    activated_at: datetime | None = None
    canceled_at: datetime | None = None


def _grant_fields(grant: TokenGrant) -> dict[str, Any]:
    return {
        "access_token": grant.access_token,
        "refresh_token": grant.refresh_token,
        "access_token_expires_at": grant.access_token_expiry_time,
        "refresh_token_expires_at": grant.refresh_token_expiry_time,
        "auth_client_id": grant.auth_client_id,
        "reference_merchant_id": grant.reference_merchant_id,
        "reference_agreement_id": grant.reference_agreement_id,
        "customer_id": grant.customer_id,
        "user_login_id": grant.user_login_id,
        "auth_state": grant.auth_state,
        "scopes": tuple(grant.scopes) if grant.scopes is not None else None,
    }


class InMemoryStore:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], _Row] = {}
        self._exchanges: dict[str, tuple[str, str]] = {}
        self.failure: str | None = None  # when set, every call raises StoreError(failure): a database outage
        self.closed = False

    def _check(self) -> None:
        if self.failure is not None:
            raise StoreError(self.failure)

    async def record_tokens(self, grant: TokenGrant) -> Transition:
        self._check()
        key = (grant.provider, grant.fingerprint)
        known = self._rows.get(key)
        if known is None:
            now = datetime.now(UTC)
            row = _Row(grant.provider, grant.fingerprint, STATUS_ACTIVE, created_at=now, activated_at=now,
                       **{k: v for k, v in _grant_fields(grant).items() if k != "access_token"},
                       access_token=grant.access_token)
            self._rows[key] = row
            return Transition(authorization_data(row), True, now)
        filled = {name: value for name, value in _grant_fields(grant).items() if value is not None}
        row = self._rows[key] = replace(known, **filled)
        return Transition(authorization_data(row), False, row.activated_at or row.created_at)

    async def record_code_exchange(self, provider: str, auth_code: str, grant: TokenGrant) -> Transition:
        transition = await self.record_tokens(grant)
        self._exchanges.setdefault(code_hash(provider, auth_code), (provider, grant.fingerprint))
        return transition

    async def record_cancellation(self, cancel: Cancellation) -> Transition:
        self._check()
        key = (cancel.provider, cancel.fingerprint)
        now = datetime.now(UTC)
        known: dict[str, Any] = {name: value for name, value in {
            "auth_client_id": cancel.auth_client_id,
            "reference_merchant_id": cancel.reference_merchant_id,
            "user_login_id": cancel.user_login_id,
        }.items() if value is not None}
        canceled: dict[str, Any] = {"status": STATUS_CANCELED, "canceled_at": now,
                                    "token_cancel_source": cancel.token_cancel_source, "cancel_reason": cancel.reason}
        row = self._rows.get(key)
        if row is None:  # a tombstone: a TOKEN_CREATED that arrives later cannot activate it
            row = self._rows[key] = _Row(cancel.provider, cancel.fingerprint, access_token=cancel.access_token,
                                         created_at=now, **known, **canceled)
            return Transition(authorization_data(row), True, now)
        if row.status == STATUS_ACTIVE:
            row = self._rows[key] = replace(row, **known, **canceled)
            return Transition(authorization_data(row), True, now)
        return Transition(authorization_data(row), False, row.canceled_at or row.created_at)

    async def find_code_exchange(self, provider: str, auth_code: str) -> AuthorizationData | None:
        self._check()
        key = self._exchanges.get(code_hash(provider, auth_code))
        return authorization_data(self._rows[key]) if key is not None else None

    async def tokens_of(self, provider: str, fingerprint: str) -> tuple[str, str | None] | None:
        self._check()
        row = self._rows.get((provider, fingerprint))
        return (row.access_token, row.refresh_token) if row is not None else None

    async def get_authorization(self, key: str) -> AuthorizationData | None:
        self._check()
        by_fingerprint = [row for row in self._rows.values() if row.access_token_fingerprint == key]
        by_agreement = [row for row in self._rows.values() if row.reference_agreement_id == key]
        found = by_fingerprint or sorted(by_agreement, key=lambda row: row.created_at, reverse=True)
        return authorization_data(found[0]) if found else None

    async def list_authorizations(self, *, status: str | None = None,
                                  merchant: str | None = None) -> list[AuthorizationData]:
        self._check()
        rows = sorted(self._rows.values(), key=lambda row: (row.created_at, row.access_token_fingerprint, row.provider))
        return [authorization_data(row) for row in rows
                if (status is None or row.status == status)
                and (merchant is None or merchant in (row.reference_merchant_id, row.auth_client_id))]

    async def expiring(self, *, before: datetime, token: TokenKind) -> list[AuthorizationData]:
        self._check()
        column = "access_token_expires_at" if token == "access" else "refresh_token_expires_at"
        due = [(getattr(row, column), row) for row in self._rows.values()
               if row.status == STATUS_ACTIVE and getattr(row, column) is not None and getattr(row, column) < before]
        return [authorization_data(row) for _, row in sorted(due, key=lambda pair: (pair[0], pair[1].access_token_fingerprint))]

    async def reencrypt_tokens(self) -> int:
        self._check()
        return len(self._rows)

    async def close(self) -> None:
        self.closed = True

