"""An in-memory :class:`~authnotify.store.repository.AuthorizationStore`, for tests of the logic above it.

It follows the same rules as the SQL store (a new grant is active, a known one is only filled in, a token an
authorization held before a refresh still names it, a cancellation of an unknown authorization leaves a
canceled tombstone, rows only go active -> canceled or expired, refreshes and scheduled work are claimed,
codes are kept as hashes) so handler tests run in milliseconds. Tokens are kept in clear here: it never
leaves the test's process. What only a database can show (transactions, migrations, concurrent writers,
encryption at rest) stays in the tests that use SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from authnotify.domain.authorizations import (
    STATUS_ACTIVE,
    STATUS_CANCELED,
    STATUS_EXPIRED,
    AuthorizationData,
    Cancellation,
    TokenGrant,
    Transition,
    code_hash,
    is_authorization_id,
    new_authorization_id,
)
from authnotify.domain.events import HeldToken, Timeline
from authnotify.errors import StoreError
from authnotify.store.repository import (
    EXPIRING_WINDOWS,
    ClaimOutcome,
    CommandOutcome,
    CurrentTokens,
    DueWork,
    DueWorkDone,
    LifecycleStats,
    Page,
    RefreshClaim,
    Schedule,
    TokenKind,
    authorization_data,
    ended_at,
    keepalive_expiry,
)


@dataclass(frozen=True)
class _Row:
    """A row with the SQL schema's column names, so it reads like one."""

    authorization_id: str
    provider: str
    access_token_fingerprint: str
    first_access_token_fingerprint: str
    status: str
    access_token: str
    created_at: datetime
    updated_at: datetime
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
    expired_at: datetime | None = None
    expiry_reason: str | None = None
    refresh_requested_at: datetime | None = None
    refresh_claimed_until: datetime | None = None
    expiry_warned_for: datetime | None = None
    expiry_warned_at: datetime | None = None
    scheduler_claimed_at: datetime | None = None

    @property
    def refresh_token_encrypted(self) -> str | None:  # what keepalive_expiry asks: is there a refresh token
        return self.refresh_token


@dataclass(frozen=True)
class _Held:
    authorization_id: str
    generation: int
    recorded_at: datetime


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


def _granted(row: _Row, created: bool) -> Transition:
    return Transition(authorization_data(row), created, row.activated_at or row.created_at,
                      row.first_access_token_fingerprint)


def _ended(row: _Row, changed: bool) -> Transition:
    return Transition(authorization_data(row), changed, ended_at(row) or row.updated_at)


class InMemoryStore:
    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}  # by authorization id
        self._held: dict[tuple[str, str], _Held] = {}  # (provider, fingerprint) -> its holder
        self._exchanges: dict[str, tuple[str, str]] = {}
        self._commands: dict[str, CommandOutcome] = {}
        self.failure: str | None = None  # when set, every call raises StoreError(failure): a database outage
        self.closed = False

    def _check(self) -> None:
        if self.failure is not None:
            raise StoreError(self.failure)

    def _holder(self, provider: str, fingerprint: str) -> _Row | None:
        held = self._held.get((provider, fingerprint))
        return self._rows[held.authorization_id] if held is not None else None

    def _put(self, row: _Row) -> _Row:
        self._rows[row.authorization_id] = row
        return row

    # --- what notifications tell us -------------------------------------------------------------------

    async def record_tokens(self, grant: TokenGrant) -> Transition:
        self._check()
        known = self._holder(grant.provider, grant.fingerprint)
        now = datetime.now(UTC)
        if known is None:
            row = _Row(new_authorization_id(), grant.provider, grant.fingerprint, grant.fingerprint, STATUS_ACTIVE,
                       created_at=now, updated_at=now, activated_at=now,
                       **{k: v for k, v in _grant_fields(grant).items() if k != "access_token"},
                       access_token=grant.access_token)
            self._held[(grant.provider, grant.fingerprint)] = _Held(row.authorization_id, 0, now)
            return _granted(self._put(row), True)
        if known.access_token_fingerprint != grant.fingerprint:  # a token it held before a refresh
            return _granted(known, False)
        filled = {name: value for name, value in _grant_fields(grant).items() if value is not None}
        return _granted(self._put(replace(known, **filled, updated_at=now)), False)

    async def record_code_exchange(self, provider: str, auth_code: str, grant: TokenGrant) -> Transition:
        transition = await self.record_tokens(grant)
        self._exchanges.setdefault(code_hash(provider, auth_code), (provider, grant.fingerprint))
        return transition

    async def record_cancellation(self, cancel: Cancellation) -> Transition:
        self._check()
        now = datetime.now(UTC)
        known: dict[str, Any] = {name: value for name, value in {
            "auth_client_id": cancel.auth_client_id,
            "reference_merchant_id": cancel.reference_merchant_id,
            "user_login_id": cancel.user_login_id,
        }.items() if value is not None}
        canceled: dict[str, Any] = {"status": STATUS_CANCELED, "canceled_at": now, "updated_at": now,
                                    "token_cancel_source": cancel.token_cancel_source, "cancel_reason": cancel.reason}
        row = self._holder(cancel.provider, cancel.fingerprint)
        if row is None:  # a tombstone: a TOKEN_CREATED that arrives later cannot activate it
            row = _Row(new_authorization_id(), cancel.provider, cancel.fingerprint, cancel.fingerprint,
                       access_token=cancel.access_token, created_at=now, **known, **canceled)
            self._held[(cancel.provider, cancel.fingerprint)] = _Held(row.authorization_id, 0, now)
            return _ended(self._put(row), True)
        if row.status == STATUS_ACTIVE:
            return _ended(self._put(replace(row, **known, **canceled, refresh_claimed_until=None)), True)
        return _ended(row, False)

    async def find_code_exchange(self, provider: str, auth_code: str) -> AuthorizationData | None:
        self._check()
        key = self._exchanges.get(code_hash(provider, auth_code))
        row = self._holder(*key) if key is not None else None
        return authorization_data(row) if row is not None else None

    # --- the lifecycle ---------------------------------------------------------------------------------

    async def claim_refresh(self, authorization_id: str, fingerprint: str, *, until: datetime) -> RefreshClaim:
        self._check()
        row = self._rows.get(authorization_id)
        if row is None:
            return RefreshClaim(ClaimOutcome.UNKNOWN)
        if row.status != STATUS_ACTIVE:
            return RefreshClaim(ClaimOutcome.ENDED, authorization_data(row))
        if row.access_token_fingerprint != fingerprint:
            return RefreshClaim(ClaimOutcome.MOVED_ON, authorization_data(row))
        if row.refresh_claimed_until is not None and row.refresh_claimed_until >= datetime.now(UTC):
            return RefreshClaim(ClaimOutcome.BUSY, authorization_data(row))
        row = self._put(replace(row, refresh_claimed_until=until))
        return RefreshClaim(ClaimOutcome.CLAIMED, authorization_data(row), self._current(row))

    async def release_refresh(self, authorization_id: str, *, request_done: bool) -> None:
        self._check()
        row = self._rows.get(authorization_id)
        if row is not None:
            pending = None if request_done else row.refresh_requested_at
            self._put(replace(row, refresh_claimed_until=None, refresh_requested_at=pending))

    async def record_refresh(self, authorization_id: str, fingerprint: str, grant: TokenGrant) -> Transition:
        self._check()
        now = datetime.now(UTC)
        row = self._rows[authorization_id]
        if row.status != STATUS_ACTIVE or row.access_token_fingerprint != fingerprint:
            return Transition(authorization_data(row), False, row.updated_at, grant.fingerprint)
        row = self._put(replace(
            row, access_token_fingerprint=grant.fingerprint, access_token=grant.access_token,
            access_token_expires_at=grant.access_token_expiry_time,
            refresh_token=grant.refresh_token or row.refresh_token,
            refresh_token_expires_at=grant.refresh_token_expiry_time or row.refresh_token_expires_at,
            customer_id=grant.customer_id or row.customer_id, user_login_id=grant.user_login_id or row.user_login_id,
            refresh_claimed_until=None, refresh_requested_at=None, updated_at=now,
        ))
        generation = 1 + max(held.generation for held in self._held.values() if held.authorization_id == authorization_id)
        self._held.setdefault((row.provider, grant.fingerprint), _Held(authorization_id, generation, now))
        return Transition(authorization_data(row), True, now, grant.fingerprint)

    async def refresh_after(self, authorization_id: str, fingerprint: str) -> Transition | None:
        self._check()
        row = self._rows[authorization_id]
        replaced = self._held.get((row.provider, fingerprint))
        if replaced is None:
            return None
        for (_, held_fingerprint), held in self._held.items():
            if held.authorization_id == authorization_id and held.generation == replaced.generation + 1:
                return Transition(authorization_data(row), False, held.recorded_at, held_fingerprint)
        return None

    async def record_expiry(self, authorization_id: str, reason: str) -> Transition:
        self._check()
        now = datetime.now(UTC)
        row = self._rows[authorization_id]
        if row.status != STATUS_ACTIVE:
            return _ended(row, False)
        return _ended(self._put(replace(row, status=STATUS_EXPIRED, expired_at=now, expiry_reason=reason[:300],
                                        updated_at=now, refresh_claimed_until=None, refresh_requested_at=None)), True)

    async def cancel_authorization(self, authorization_id: str, *, source: str, reason: str | None) -> Transition:
        self._check()
        now = datetime.now(UTC)
        row = self._rows[authorization_id]
        if row.status != STATUS_ACTIVE:
            return _ended(row, False)
        return _ended(self._put(replace(row, status=STATUS_CANCELED, canceled_at=now, token_cancel_source=source,
                                        cancel_reason=reason, updated_at=now, refresh_claimed_until=None)), True)

    @staticmethod
    def _due(row: _Row, schedule: Schedule, now: datetime) -> tuple[bool, datetime | None]:
        """(refresh request due, keep-alive expiry a warning is due for): the SQL store's conditions."""
        if row.status != STATUS_ACTIVE:
            return False, None
        not_pending = row.refresh_requested_at is None or row.refresh_requested_at < now - schedule.pending
        refresh_valid = row.refresh_token is not None and (
            row.refresh_token_expires_at is None or row.refresh_token_expires_at > now)
        access = row.access_token_expires_at
        outlives = row.refresh_token_expires_at is None or (
            access is not None and row.refresh_token_expires_at > access)
        refresh = access is not None and not_pending and (
            (refresh_valid and outlives and access < now + schedule.refresh_before)
            or (not refresh_valid and access <= now))
        keepalive = keepalive_expiry(row)
        warn = (keepalive is not None and now < keepalive < now + schedule.expiry_warning
                and row.expiry_warned_for != keepalive)
        return refresh, keepalive if warn else None

    async def claim_due_work(self, schedule: Schedule, *, limit: int) -> list[DueWork]:
        self._check()
        now = datetime.now(UTC)
        works: list[DueWork] = []
        candidates = sorted(self._rows.values(), key=lambda r: (r.access_token_expires_at is None,
                                                                r.access_token_expires_at or now))
        for row in candidates:
            if len(works) >= limit:
                break
            if row.scheduler_claimed_at is not None and row.scheduler_claimed_at >= now - schedule.lease:
                continue
            refresh, warn_for = self._due(row, schedule, now)
            if refresh or warn_for is not None:
                row = self._put(replace(row, scheduler_claimed_at=now))
                works.append(DueWork(authorization_data(row), now, refresh, warn_for))
        return works

    async def finish_due_work(self, done: list[DueWorkDone]) -> None:
        self._check()
        for item in done:
            work = item.work
            assert work.authorization.authorizationId is not None
            row = self._rows[work.authorization.authorizationId]
            if row.scheduler_claimed_at != work.claimed_at:
                continue
            changes: dict[str, Any] = {"scheduler_claimed_at": None}
            if (item.refresh_published and row.status == STATUS_ACTIVE
                    and row.access_token_fingerprint == work.authorization.accessTokenFingerprint):
                changes["refresh_requested_at"] = work.claimed_at
            if item.warning_published:
                changes.update(expiry_warned_for=work.warn_for, expiry_warned_at=work.claimed_at)
            self._put(replace(row, **changes))

    async def lifecycle_stats(self, schedule: Schedule) -> LifecycleStats:
        self._check()
        now = datetime.now(UTC)
        by_status: dict[str, int] = {}
        expiring: dict[tuple[TokenKind, str], int] = {(kind, label): 0 for label, _ in EXPIRING_WINDOWS
                                                      for kind in ("access", "refresh")}
        oldest: list[datetime] = []
        for row in self._rows.values():
            by_status[row.status] = by_status.get(row.status, 0) + 1
            if row.status != STATUS_ACTIVE:
                continue
            for label, window in EXPIRING_WINDOWS:
                for kind, moment in (("access", row.access_token_expires_at), ("refresh", row.refresh_token_expires_at)):
                    if moment is not None and now < moment < now + window:
                        expiring[(kind, label)] += 1  # type: ignore[index]
            refresh, warn_for = self._due(row, schedule, now)
            if refresh and row.access_token_expires_at is not None:
                refresh_valid = row.refresh_token is not None and (
                    row.refresh_token_expires_at is None or row.refresh_token_expires_at > now)
                oldest.append(row.access_token_expires_at - (schedule.refresh_before if refresh_valid else timedelta(0)))
            if warn_for is not None:
                oldest.append(warn_for - schedule.expiry_warning)
        return LifecycleStats(by_status, expiring, min(oldest) if oldest else None)

    async def record_command(self, outcome: CommandOutcome) -> None:
        self._check()
        self._commands[outcome.command_id] = outcome

    async def command(self, command_id: str) -> CommandOutcome | None:
        self._check()
        return self._commands.get(command_id)

    # --- reads ----------------------------------------------------------------------------------------------

    def _current(self, row: _Row) -> CurrentTokens:
        return CurrentTokens(authorization_data(row), row.access_token, row.refresh_token,
                             row.access_token_expires_at, row.refresh_token_expires_at)

    async def tokens_of(self, provider: str, fingerprint: str) -> tuple[str, str | None] | None:
        self._check()
        row = self._holder(provider, fingerprint)
        return (row.access_token, row.refresh_token) if row is not None else None

    async def current_tokens(self, authorization_id: str) -> CurrentTokens | None:
        self._check()
        row = self._rows.get(authorization_id)
        return self._current(row) if row is not None else None

    async def get_authorization(self, key: str) -> AuthorizationData | None:
        self._check()
        if is_authorization_id(key):
            row = self._rows.get(key)
            return authorization_data(row) if row is not None else None
        current = [row for row in self._rows.values() if row.access_token_fingerprint == key]
        former = [self._rows[held.authorization_id] for (_, fingerprint), held in self._held.items()
                  if fingerprint == key]
        by_agreement = sorted((row for row in self._rows.values() if row.reference_agreement_id == key),
                              key=lambda row: row.updated_at, reverse=True)
        found = current or former or by_agreement
        return authorization_data(found[0]) if found else None

    async def timeline(self, authorization_id: str) -> Timeline | None:
        self._check()
        row = self._rows.get(authorization_id)
        if row is None:
            return None
        held = sorted(((h.generation, fingerprint, h.recorded_at) for (_, fingerprint), h in self._held.items()
                       if h.authorization_id == authorization_id))
        return Timeline(authorization_data(row), [HeldToken(fingerprint, at) for _, fingerprint, at in held],
                        row.activated_at, row.expiry_warned_for, row.expiry_warned_at, ended_at(row))

    def _matching(self, status: str | None, merchant: str | None, provider: str | None,
                  expiring_before: datetime | None) -> list[_Row]:
        rows = sorted(self._rows.values(), key=lambda row: (row.created_at, row.authorization_id))
        chosen = []
        for row in rows:
            if status is not None and row.status != status:
                continue
            if provider is not None and row.provider != provider:
                continue
            if merchant is not None and merchant not in (row.reference_merchant_id, row.auth_client_id):
                continue
            if expiring_before is not None:
                keepalive = keepalive_expiry(row)
                if row.status != STATUS_ACTIVE or keepalive is None or keepalive >= expiring_before:
                    continue
            chosen.append(row)
        return chosen

    async def list_authorizations(self, *, status: str | None = None, merchant: str | None = None,
                                  provider: str | None = None,
                                  expiring_before: datetime | None = None) -> list[AuthorizationData]:
        self._check()
        return [authorization_data(row) for row in self._matching(status, merchant, provider, expiring_before)]

    async def page_authorizations(self, *, status: str | None = None, merchant: str | None = None,
                                  provider: str | None = None, expiring_before: datetime | None = None,
                                  after: tuple[datetime, str] | None = None, limit: int = 100) -> Page:
        self._check()
        rows = [row for row in self._matching(status, merchant, provider, expiring_before)
                if after is None or (row.created_at, row.authorization_id) > after]
        page = rows[:limit]
        more = len(rows) > limit
        return Page([authorization_data(row) for row in page],
                    (page[-1].created_at, page[-1].authorization_id) if more and page else None)

    async def expiring(self, *, before: datetime, token: TokenKind) -> list[AuthorizationData]:
        self._check()
        column = "access_token_expires_at" if token == "access" else "refresh_token_expires_at"
        due = [(getattr(row, column), row) for row in self._rows.values()
               if row.status == STATUS_ACTIVE and getattr(row, column) is not None and getattr(row, column) < before]
        return [authorization_data(row) for _, row in sorted(due, key=lambda pair: (pair[0], pair[1].authorization_id))]

    async def reencrypt_tokens(self) -> int:
        self._check()
        return len(self._rows)

    async def close(self) -> None:
        self.closed = True
