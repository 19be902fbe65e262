"""The store on SQLite or PostgreSQL: authorizations (tokens encrypted), the tokens each held, exchanged auth
codes (hashed) and lifecycle commands.

Every write is short and idempotent, made of Core statements (no ORM session). Recording grants goes one
way, whatever the caller: a multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` into
``authorization_tokens`` claims the tokens nobody held yet, the authorizations of those are inserted in the
same transaction, then an ``UPDATE ... RETURNING`` per known one fills in what it lacks, in key order, so
concurrent writers never deadlock, never hit a unique violation and never both see "new"; a token an
authorization held before a refresh is known too, so a redelivered TOKEN_CREATED never makes a second one.
Concurrent ``record_tokens`` calls share that write (:mod:`authnotify.store.group_commit`); on PostgreSQL
both inserts are one statement of the fast path (:mod:`authnotify.store.postgres`). Every other write of a
handler (code exchanges, cancellations, the refresh claims and their results, expiries, revocations, command
outcomes) is group-committed too: the writes submitted together run in one transaction (:meth:`SqlStore._write`).

Rows only ever go active -> canceled or active -> expired; a refresh replaces the token of an active one
under a short claim (``refresh_claimed_until``) that its worker takes first. The scheduler claims due work
with ``FOR UPDATE SKIP LOCKED`` and a lease (``scheduler_claimed_at``) on PostgreSQL, and with one atomic
``UPDATE ... RETURNING`` on SQLite, whose writers are serialised anyway.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, case, func, literal, not_, or_, select, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from authnotify.config import TokenKeys
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
from authnotify.observability.redaction import mask_url
from authnotify.store.encryption import TokenCipher
from authnotify.store.engine import create_engine, parse_url, postgres_target
from authnotify.store.errors import database_errors
from authnotify.store.group_commit import GroupCommit
from authnotify.store.postgres import NewGrantInserter
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
)
from authnotify.store.schema import authorization_tokens, authorizations, code_exchanges, commands

a = authorizations
t = authorization_tokens
_COLUMNS = tuple(a.c)
_TOKEN_KEY = (t.c.access_token_fingerprint, t.c.provider)
# What a grant may carry: set on a new row, and filled in (never erased) on a known one.
_GRANT_FIELDS = (
    "access_token_encrypted", "refresh_token_encrypted", "access_token_expires_at", "refresh_token_expires_at",
    "auth_client_id", "reference_merchant_id", "reference_agreement_id", "customer_id", "user_login_id",
    "auth_state", "scopes",
)
_NEW_ROW = {"p_status": STATUS_ACTIVE, "p_canceled_at": None, "p_token_cancel_source": None, "p_cancel_reason": None,
            "p_expired_at": None, "p_expiry_reason": None, "p_refresh_requested_at": None,
            "p_refresh_claimed_until": None, "p_expiry_warned_for": None, "p_expiry_warned_at": None,
            "p_scheduler_claimed_at": None}


def _now() -> datetime:
    return datetime.now(UTC)


def _granted(row: Any, created: bool) -> Transition:
    return Transition(authorization_data(row), created, row.activated_at or row.created_at,
                      row.first_access_token_fingerprint)


def _ended(row: Any, changed: bool) -> Transition:
    return Transition(authorization_data(row), changed, ended_at(row) or row.updated_at)


def _present(values: dict[str, Any]) -> dict[str, Any]:
    """Only what a message knows: an absent field never erases a known one."""
    return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True, slots=True)
class _Write:
    """One write of a handler: what it does on a connection inside the batch's transaction."""

    action: str  # "cannot record cancellation": what a failure says
    apply: Callable[[AsyncConnection], Awaitable[Any]]


class _Due:
    """The scheduler's conditions as SQL, built once over bind parameters (now and the schedule's times).

    The same expressions select the due rows and say, in the RETURNING clause, what is due for each.
    """

    def __init__(self) -> None:
        now = bindparam("now", type_=a.c.updated_at.type)
        refresh_horizon = bindparam("refresh_horizon", type_=a.c.updated_at.type)  # now + refresh_before
        warning_horizon = bindparam("warning_horizon", type_=a.c.updated_at.type)  # now + expiry_warning
        pending_since = bindparam("pending_since", type_=a.c.updated_at.type)  # now - pending
        lease_since = bindparam("lease_since", type_=a.c.updated_at.type)  # now - lease
        has_refresh = a.c.refresh_token_encrypted.is_not(None)
        refresh_valid = and_(has_refresh, or_(a.c.refresh_token_expires_at.is_(None),
                                              a.c.refresh_token_expires_at > now))
        not_pending = or_(a.c.refresh_requested_at.is_(None), a.c.refresh_requested_at < pending_since)
        self.keepalive = case((has_refresh, a.c.refresh_token_expires_at), else_=a.c.access_token_expires_at)
        # Refresh while the refresh token is valid and outlives the access token (a refresh cannot give more
        # than that: asking again and again near its end would only hammer Alipay); once it cannot be
        # refreshed, the request expires it.
        outlives = or_(a.c.refresh_token_expires_at.is_(None),
                       a.c.refresh_token_expires_at > a.c.access_token_expires_at)
        self.to_refresh = and_(not_pending, refresh_valid, outlives, a.c.access_token_expires_at < refresh_horizon)
        self.to_expire = and_(not_pending, not_(refresh_valid), a.c.access_token_expires_at <= now)
        self.refresh = or_(self.to_refresh, self.to_expire)
        self.warning = and_(
            self.keepalive.is_not(None), self.keepalive > now, self.keepalive < warning_horizon,
            or_(a.c.expiry_warned_for.is_(None), a.c.expiry_warned_for != self.keepalive),
        )
        self.unclaimed = or_(a.c.scheduler_claimed_at.is_(None), a.c.scheduler_claimed_at < lease_since)
        # Redundant with the above, but answerable from the expiry-time indexes: most rows are not due.
        self.near = or_(a.c.access_token_expires_at < refresh_horizon, a.c.access_token_expires_at < warning_horizon,
                        a.c.refresh_token_expires_at < warning_horizon)
        self.any = and_(a.c.status == STATUS_ACTIVE, self.near, or_(self.refresh, self.warning))

    @staticmethod
    def params(schedule: Schedule, now: datetime) -> dict[str, Any]:
        return {"now": now, "refresh_horizon": now + schedule.refresh_before,
                "warning_horizon": now + schedule.expiry_warning, "pending_since": now - schedule.pending,
                "lease_since": now - schedule.lease}


class SqlStore:
    def __init__(self, engine: AsyncEngine, token_keys: TokenKeys | None, database_url: str) -> None:
        self._engine = engine
        self._cipher = TokenCipher(token_keys)
        self._where = mask_url(database_url)
        self._sqlite = engine.dialect.name == "sqlite"
        self._insert: Callable[..., Any] = sqlite.insert if self._sqlite else postgresql.insert
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        # Built once with bind parameters: constructing statements per call costs more than running them.
        self._claim_tokens = (
            self._insert(t)
            .values({column: bindparam(f"p_{column.name}", type_=column.type) for column in t.c})
            .on_conflict_do_nothing(index_elements=list(_TOKEN_KEY))
            .returning(t.c.authorization_id)
        )
        self._insert_grants = (
            self._insert(a)
            .values({column: bindparam(f"p_{column.name}", type_=column.type) for column in _COLUMNS})
            .returning(*_COLUMNS)
        )
        self._fill_in_grant = (
            a.update()
            .where((a.c.provider == bindparam("p_provider"))
                   & (a.c.access_token_fingerprint == bindparam("p_access_token_fingerprint")))
            .values({
                name: (bindparam("p_updated_at", type_=a.c.updated_at.type) if name == "updated_at"
                       else func.coalesce(bindparam(f"p_{name}", type_=a.c[name].type), a.c[name]))
                for name in (*_GRANT_FIELDS, "updated_at")
            })
            .returning(*_COLUMNS)
        )
        self._holder_of = (
            select(*_COLUMNS)
            .join(t, t.c.authorization_id == a.c.authorization_id)
            .where((t.c.provider == bindparam("p_provider"))
                   & (t.c.access_token_fingerprint == bindparam("p_access_token_fingerprint")))
        )
        self._due = _Due()
        self._fast_insert = (None if self._sqlite
                             else NewGrantInserter(postgres_target(parse_url(database_url)), self._where))
        self._grants: GroupCommit[TokenGrant, Transition] = GroupCommit(self._record_grants,
                                                                        name="store-record-tokens")
        self._writes: GroupCommit[_Write, Any] = GroupCommit(self._apply_writes, name="store-writes")

    @classmethod
    async def connect(cls, database_url: str, token_keys: TokenKeys | None, *, migrate: bool = True) -> SqlStore:
        """Opens the pool (and brings the schema to head); :class:`StoreError` if the database is unreachable."""
        if migrate:
            from authnotify.store.migrations import upgrade_database

            await upgrade_database(database_url)
        parse_url(database_url)
        engine = create_engine(database_url)
        store = cls(engine, token_keys, database_url)
        if not migrate:
            try:
                with store._errors("database unreachable"):
                    async with engine.connect():
                        pass
            except StoreError:
                await engine.dispose()
                raise
        return store

    async def close(self) -> None:
        await self._grants.close()
        await self._writes.close()
        if self._fast_insert is not None:
            await self._fast_insert.close()
        await self._engine.dispose()

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return database_errors(f"{action} ({self._where})")

    # --- writes: what notifications tell us ------------------------------------------------------------

    async def _write(self, action: str, apply: Callable[[AsyncConnection], Awaitable[Any]]) -> Any:
        """Runs ``apply`` in the transaction of every write submitted in the same turn (group commit); returns
        once that transaction is committed. A failed batch is retried one write at a time, so an error (or a
        refused write) fails its own caller only."""
        return await self._writes.submit(_Write(action, apply))

    async def _apply_writes(self, writes: Sequence[_Write]) -> list[Any]:
        action = writes[0].action if len(writes) == 1 else f"cannot record {len(writes)} writes"
        with self._errors(action):
            async with self._engine.begin() as conn:
                return [await write.apply(conn) for write in writes]

    async def record_tokens(self, grant: TokenGrant) -> Transition:
        """Returns once the effect is committed; concurrent calls are committed together (group commit)."""
        self._cipher.require_keys()  # a missing key fails this call, not a whole batch
        return await self._grants.submit(grant)

    async def _record_grants(self, grants: Sequence[TokenGrant]) -> list[Transition]:
        with self._errors("cannot record tokens"):
            if self._sqlite:  # the two inserts of new authorizations must commit together
                async with self._engine.begin() as conn:
                    return await self._write_grants(conn, grants, _now(), fast=False)
            return await self._write_grants(None, grants, _now(), fast=True)

    async def record_code_exchange(self, provider: str, auth_code: str, grant: TokenGrant) -> Transition:
        self._cipher.require_keys()  # a missing key fails this call, not a whole batch
        now = _now()

        async def apply(conn: AsyncConnection) -> Transition:
            (transition,) = await self._write_grants(conn, [grant], now, fast=False)
            await conn.execute(
                self._insert(code_exchanges)
                .values(code_hash=code_hash(provider, auth_code), provider=provider,
                        access_token_fingerprint=grant.fingerprint, exchanged_at=now)
                .on_conflict_do_nothing(index_elements=[code_exchanges.c.code_hash])
            )
            return transition

        transition: Transition = await self._write("cannot record code exchange", apply)
        return transition

    async def _write_grants(self, conn: AsyncConnection | None, grants: Sequence[TokenGrant], now: datetime, *,
                            fast: bool) -> list[Transition]:
        """Every new grant claimed and inserted at once, then the known ones filled in: the same outcome as
        one by one.

        ``fast``: the inserts take PostgreSQL's fast path, and ``conn`` is None: a connection that commits each
        statement on its own is opened only if a known grant needs filling in (a batch of new ones, the
        common case, never checks one out of SQLAlchemy's pool).
        """
        params = [self._grant_params(grant, now) for grant in grants]
        keys = [(p["p_access_token_fingerprint"], p["p_provider"]) for p in params]
        first: dict[tuple[str, str], int] = {}
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        new_rows = sorted((params[index] for index in first.values()),
                          key=lambda p: (p["p_access_token_fingerprint"], p["p_provider"]))
        if fast and self._fast_insert is not None:
            inserted = await self._fast_insert.insert(new_rows, now)
        else:
            assert conn is not None
            inserted = await self._insert_new(conn, new_rows, now)
        transitions: list[Transition | None] = [None] * len(grants)
        known: list[int] = []
        for index, key in enumerate(keys):
            if first[key] == index and key in inserted:
                transitions[index] = _granted(inserted[key], created=True)
            else:  # known before this batch, or a repeat within it: filled in after, status stays
                known.append(index)
        if known:
            if conn is None:
                async with self._autocommit.connect() as own:
                    await self._fill_in_grants(own, known, keys, params, transitions)
            else:
                await self._fill_in_grants(conn, known, keys, params, transitions)
        return [transition for transition in transitions if transition is not None]

    async def _fill_in_grants(self, conn: AsyncConnection, known: list[int], keys: list[tuple[str, str]],
                              params: list[dict[str, Any]], transitions: list[Transition | None]) -> None:
        # Key order: concurrent batches lock rows in the same order, never deadlock.
        for index in sorted(known, key=lambda i: (keys[i], i)):
            row = (await conn.execute(self._fill_in_grant, params[index])).first()
            if row is None:  # a token the authorization held before a refresh: nothing to fill in
                row = (await conn.execute(self._holder_of, params[index])).first()
            if row is None:  # pragma: no cover - rows are never deleted
                raise StoreError("authorization vanished while recording tokens")
            transitions[index] = _granted(row, created=False)

    async def _insert_new(self, conn: AsyncConnection, rows: list[dict[str, Any]], now: datetime) -> dict[
            tuple[str, str], Any]:
        """The rows whose token nobody held: claimed in authorization_tokens, then inserted (``conn``'s transaction)."""
        if not rows:
            return {}
        claims = [{"p_access_token_fingerprint": r["p_access_token_fingerprint"], "p_provider": r["p_provider"],
                   "p_authorization_id": r["p_authorization_id"], "p_generation": 0, "p_recorded_at": now}
                  for r in rows]
        claimed = {row.authorization_id for row in (await conn.execute(self._claim_tokens, claims)).all()}
        new_rows = [r for r in rows if r["p_authorization_id"] in claimed]
        if not new_rows:
            return {}
        result = await conn.execute(
            self._insert_grants,
            [{**values, **_NEW_ROW, "p_first_access_token_fingerprint": values["p_access_token_fingerprint"],
              "p_created_at": now, "p_activated_at": now} for values in new_rows],
        )
        return {(row.access_token_fingerprint, row.provider): row for row in result.all()}

    def _grant_params(self, grant: TokenGrant, now: datetime) -> dict[str, Any]:
        return {
            "p_authorization_id": new_authorization_id(),  # used only if the grant turns out to be new
            "p_provider": grant.provider,
            "p_access_token_fingerprint": grant.fingerprint,
            "p_access_token_encrypted": self._cipher.encrypt(grant.access_token),
            "p_refresh_token_encrypted": self._cipher.encrypt_optional(grant.refresh_token),
            "p_access_token_expires_at": grant.access_token_expiry_time,
            "p_refresh_token_expires_at": grant.refresh_token_expiry_time,
            "p_auth_client_id": grant.auth_client_id,
            "p_reference_merchant_id": grant.reference_merchant_id,
            "p_reference_agreement_id": grant.reference_agreement_id,
            "p_customer_id": grant.customer_id,
            "p_user_login_id": grant.user_login_id,
            "p_auth_state": grant.auth_state,
            "p_scopes": list(grant.scopes) if grant.scopes is not None else None,
            "p_updated_at": now,
        }

    async def record_cancellation(self, cancel: Cancellation) -> Transition:
        encrypted_token = self._cipher.encrypt(cancel.access_token)
        fingerprint = cancel.fingerprint
        now = _now()
        known = _present({
            "auth_client_id": cancel.auth_client_id,
            "reference_merchant_id": cancel.reference_merchant_id,
            "user_login_id": cancel.user_login_id,
        })
        cancel_fields = {"token_cancel_source": cancel.token_cancel_source, "cancel_reason": cancel.reason}
        authorization_id = new_authorization_id()

        async def apply(conn: AsyncConnection) -> Transition:
            # No authorization ever held it: a tombstone, so a TOKEN_CREATED that arrives later cannot
            # activate it.
            claimed = (await conn.execute(self._claim_tokens, {
                "p_access_token_fingerprint": fingerprint, "p_provider": cancel.provider,
                "p_authorization_id": authorization_id, "p_generation": 0, "p_recorded_at": now,
            })).first()
            if claimed is not None:
                tombstone = a.insert().values(
                    authorization_id=authorization_id, provider=cancel.provider,
                    access_token_fingerprint=fingerprint, first_access_token_fingerprint=fingerprint,
                    status=STATUS_CANCELED, access_token_encrypted=encrypted_token, created_at=now,
                    updated_at=now, canceled_at=now, **known, **cancel_fields,
                ).returning(*_COLUMNS)
                return _ended((await conn.execute(tombstone)).one(), changed=True)
            holder = (await conn.execute(
                select(t.c.authorization_id).where((t.c.provider == cancel.provider)
                                                   & (t.c.access_token_fingerprint == fingerprint))
            )).scalar_one()
            cancel_active = (
                a.update()
                .where((a.c.authorization_id == holder) & (a.c.status == STATUS_ACTIVE))
                .values(status=STATUS_CANCELED, canceled_at=now, updated_at=now, refresh_claimed_until=None,
                        **known, **cancel_fields)
                .returning(*_COLUMNS)
            )
            row = (await conn.execute(cancel_active)).first()
            if row is not None:
                return _ended(row, changed=True)
            # Already canceled (or expired): the first ending's facts and time stand.
            row = (await conn.execute(select(*_COLUMNS).where(a.c.authorization_id == holder))).one()
            return _ended(row, changed=False)

        transition: Transition = await self._write("cannot record cancellation", apply)
        return transition

    # --- writes: the lifecycle ------------------------------------------------------------------------

    async def claim_refresh(self, authorization_id: str, fingerprint: str, *, until: datetime) -> RefreshClaim:
        now = _now()
        claim = (
            a.update()
            .where((a.c.authorization_id == authorization_id) & (a.c.status == STATUS_ACTIVE)
                   & (a.c.access_token_fingerprint == fingerprint)
                   & or_(a.c.refresh_claimed_until.is_(None), a.c.refresh_claimed_until < now))
            .values(refresh_claimed_until=until)
            .returning(*_COLUMNS)
        )

        async def apply(conn: AsyncConnection) -> tuple[Any, bool]:
            row = (await conn.execute(claim)).first()
            if row is not None:
                return row, True
            return (await conn.execute(select(*_COLUMNS).where(a.c.authorization_id == authorization_id))).first(), False

        row, claimed = await self._write("cannot claim refresh", apply)
        if row is None:
            return RefreshClaim(ClaimOutcome.UNKNOWN)
        data = authorization_data(row)
        if claimed:
            return RefreshClaim(ClaimOutcome.CLAIMED, data, self._current(row))
        if row.status != STATUS_ACTIVE:
            return RefreshClaim(ClaimOutcome.ENDED, data)
        if row.access_token_fingerprint != fingerprint:
            return RefreshClaim(ClaimOutcome.MOVED_ON, data)
        return RefreshClaim(ClaimOutcome.BUSY, data)

    async def release_refresh(self, authorization_id: str, *, request_done: bool) -> None:
        released: dict[str, Any] = {"refresh_claimed_until": None}
        if request_done:
            released["refresh_requested_at"] = None
        release = a.update().where(a.c.authorization_id == authorization_id).values(**released)

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(release)

        await self._write("cannot release refresh", apply)

    async def record_refresh(self, authorization_id: str, fingerprint: str, grant: TokenGrant) -> Transition:
        self._cipher.require_keys()
        now = _now()
        generation = (select(func.coalesce(func.max(t.c.generation), 0) + 1)
                      .where(t.c.authorization_id == authorization_id).scalar_subquery())

        async def apply(conn: AsyncConnection) -> Transition:
            row = (await conn.execute(
                a.update()
                .where((a.c.authorization_id == authorization_id) & (a.c.status == STATUS_ACTIVE)
                       & (a.c.access_token_fingerprint == fingerprint))
                .values(access_token_fingerprint=grant.fingerprint,
                        access_token_encrypted=self._cipher.encrypt(grant.access_token),
                        access_token_expires_at=grant.access_token_expiry_time,
                        # An answer without a new refresh token leaves the one we hold in place.
                        refresh_token_encrypted=func.coalesce(
                            literal(self._cipher.encrypt_optional(grant.refresh_token),
                                    type_=a.c.refresh_token_encrypted.type),
                            a.c.refresh_token_encrypted),
                        refresh_token_expires_at=func.coalesce(
                            literal(grant.refresh_token_expiry_time, type_=a.c.refresh_token_expires_at.type),
                            a.c.refresh_token_expires_at),
                        customer_id=func.coalesce(literal(grant.customer_id, type_=a.c.customer_id.type),
                                                  a.c.customer_id),
                        user_login_id=func.coalesce(literal(grant.user_login_id, type_=a.c.user_login_id.type),
                                                    a.c.user_login_id),
                        refresh_claimed_until=None, refresh_requested_at=None, updated_at=now)
                .returning(*_COLUMNS)
            )).first()
            if row is None:  # canceled meanwhile, or refreshed by another: what is there stands
                current = (await conn.execute(select(*_COLUMNS).where(a.c.authorization_id == authorization_id))).first()
                if current is None:
                    raise StoreError(f"no authorization {authorization_id}")
                return Transition(authorization_data(current), False, current.updated_at, grant.fingerprint)
            # An answer repeating the token it replaces adds no new token to the history.
            await conn.execute(self._insert(t).values(
                access_token_fingerprint=grant.fingerprint, provider=row.provider,
                authorization_id=authorization_id, generation=generation, recorded_at=now,
            ).on_conflict_do_nothing(index_elements=list(_TOKEN_KEY)))
            return Transition(authorization_data(row), True, now, grant.fingerprint)

        transition: Transition = await self._write("cannot record refresh", apply)
        return transition

    async def refresh_after(self, authorization_id: str, fingerprint: str) -> Transition | None:
        replaced = t.alias("replaced")
        query = (
            select(t.c.access_token_fingerprint, t.c.recorded_at)
            .join(replaced, (replaced.c.authorization_id == t.c.authorization_id)
                  & (replaced.c.generation + 1 == t.c.generation))
            .where((t.c.authorization_id == authorization_id) & (replaced.c.access_token_fingerprint == fingerprint))
        )
        with self._errors("cannot read refresh"):
            async with self._engine.connect() as conn:
                token = (await conn.execute(query)).first()
                if token is None:
                    return None
                row = (await conn.execute(select(*_COLUMNS).where(a.c.authorization_id == authorization_id))).one()
        return Transition(authorization_data(row), False, token.recorded_at, token.access_token_fingerprint)

    async def record_expiry(self, authorization_id: str, reason: str) -> Transition:
        now = _now()
        expire = (
            a.update()
            .where((a.c.authorization_id == authorization_id) & (a.c.status == STATUS_ACTIVE))
            .values(status=STATUS_EXPIRED, expired_at=now, expiry_reason=reason[:300], updated_at=now,
                    refresh_claimed_until=None, refresh_requested_at=None)
            .returning(*_COLUMNS)
        )
        return await self._end(expire, authorization_id, "cannot record expiry")

    async def cancel_authorization(self, authorization_id: str, *, source: str, reason: str | None) -> Transition:
        now = _now()
        cancel = (
            a.update()
            .where((a.c.authorization_id == authorization_id) & (a.c.status == STATUS_ACTIVE))
            .values(status=STATUS_CANCELED, canceled_at=now, token_cancel_source=source, cancel_reason=reason,
                    updated_at=now, refresh_claimed_until=None)
            .returning(*_COLUMNS)
        )
        return await self._end(cancel, authorization_id, "cannot record revocation")

    async def _end(self, statement: Any, authorization_id: str, action: str) -> Transition:
        async def apply(conn: AsyncConnection) -> Transition:
            row = (await conn.execute(statement)).first()
            if row is not None:
                return _ended(row, changed=True)
            row = (await conn.execute(select(*_COLUMNS).where(a.c.authorization_id == authorization_id))).first()
            if row is None:
                raise StoreError(f"no authorization {authorization_id}")
            return _ended(row, changed=False)

        transition: Transition = await self._write(action, apply)
        return transition

    # --- the scheduler's claims -------------------------------------------------------------------------

    async def claim_due_work(self, schedule: Schedule, *, limit: int) -> list[DueWork]:
        now = _now()
        due = self._due
        chosen = select(a.c.authorization_id).where(due.any, due.unclaimed).order_by(
            a.c.access_token_expires_at).limit(limit)
        if not self._sqlite:
            chosen = chosen.with_for_update(skip_locked=True)  # another scheduler's rows are passed over
        claim = (
            a.update()
            .where(a.c.authorization_id.in_(chosen.scalar_subquery()))
            .values(scheduler_claimed_at=now)
            .returning(*_COLUMNS)
        )
        params = due.params(schedule, now)
        with self._errors("cannot claim due work"):
            async with self._engine.begin() as conn:
                rows = (await conn.execute(claim, params)).all()
                # What is due for each, in a query of its own: SQLite's RETURNING mixes up bound parameters.
                kinds = {row.authorization_id: row for row in (await conn.execute(
                    select(a.c.authorization_id, due.refresh.label("refresh"),
                           case((due.warning, due.keepalive), else_=None).label("warn_for"))
                    .where(a.c.authorization_id.in_([row.authorization_id for row in rows])), params)).all()
                } if rows else {}
        works = []
        for row in rows:
            kind = kinds[row.authorization_id]
            warn_for = kind.warn_for
            if isinstance(warn_for, str):  # SQLite hands a CASE of timestamps back as text
                warn_for = datetime.fromisoformat(warn_for)
            if warn_for is not None and warn_for.tzinfo is None:
                warn_for = warn_for.replace(tzinfo=UTC)
            works.append(DueWork(authorization_data(row), now, bool(kind.refresh), warn_for))
        return works

    async def finish_due_work(self, done: list[DueWorkDone]) -> None:
        if not done:
            return
        claimed_at = bindparam("p_claimed_at", type_=a.c.scheduler_claimed_at.type)
        refreshed = bindparam("p_refreshed", type_=a.c.status.type) == "yes"
        warned = bindparam("p_warned", type_=a.c.status.type) == "yes"
        finish = (
            a.update()
            .where((a.c.authorization_id == bindparam("p_id")) & (a.c.scheduler_claimed_at == claimed_at))
            .values(
                scheduler_claimed_at=None,
                # Pending only while it still holds the token it was asked about: a worker may have been quicker.
                refresh_requested_at=case(
                    (and_(refreshed, a.c.access_token_fingerprint == bindparam("p_fingerprint"),
                          a.c.status == STATUS_ACTIVE), claimed_at),
                    else_=a.c.refresh_requested_at),
                expiry_warned_for=case(
                    (warned, bindparam("p_warn_for", type_=a.c.expiry_warned_for.type)), else_=a.c.expiry_warned_for),
                expiry_warned_at=case((warned, claimed_at), else_=a.c.expiry_warned_at),
            )
        )
        params = [{
            "p_id": item.work.authorization.authorizationId, "p_claimed_at": item.work.claimed_at,
            "p_refreshed": "yes" if item.refresh_published else "no",
            "p_fingerprint": item.work.authorization.accessTokenFingerprint,
            "p_warned": "yes" if item.warning_published else "no", "p_warn_for": item.work.warn_for,
        } for item in sorted(done, key=lambda d: d.work.authorization.authorizationId or "")]
        with self._errors("cannot record published work"):
            async with self._engine.begin() as conn:
                await conn.execute(finish, params)

    async def lifecycle_stats(self, schedule: Schedule) -> LifecycleStats:
        now = _now()
        due = self._due
        expiring_columns: list[Any] = []
        for label, window in EXPIRING_WINDOWS:
            for kind, column in (("access", a.c.access_token_expires_at), ("refresh", a.c.refresh_token_expires_at)):
                expiring_columns.append(func.count().filter(
                    (a.c.status == STATUS_ACTIVE) & (column > now) & (column < now + window)).label(f"{kind}_{label}"))
        with self._errors("cannot read lifecycle statistics"):
            async with self._engine.connect() as conn:
                by_status: dict[str, int] = {row.status: int(row.total) for row in (await conn.execute(
                    select(a.c.status, func.count().label("total")).group_by(a.c.status))).all()}
                counts = (await conn.execute(select(*expiring_columns))).one()
                # The oldest due time among work not yet published: a refresh is due refresh_before ahead of
                # the access token's expiry, an expiry at it, a warning expiry_warning ahead of the keep-alive.
                params = due.params(schedule, now)
                active = and_(a.c.status == STATUS_ACTIVE, due.near)
                firsts = (await conn.execute(select(
                    select(func.min(a.c.access_token_expires_at)).where(active, due.to_refresh).scalar_subquery(),
                    select(func.min(a.c.access_token_expires_at)).where(active, due.to_expire).scalar_subquery(),
                    select(func.min(due.keepalive)).where(active, due.warning).scalar_subquery(),
                ), params)).one()
        oldest = [when - offset for when, offset in zip(
            (self._as_time(value) if value is not None else None for value in firsts),
            (schedule.refresh_before, timedelta(0), schedule.expiry_warning), strict=True) if when is not None]
        return LifecycleStats(
            by_status=by_status,
            expiring={(kind, label): int(getattr(counts, f"{kind}_{label}"))
                      for label, _ in EXPIRING_WINDOWS for kind in ("access", "refresh")},
            oldest_due=min(oldest) if oldest else None,
        )

    @staticmethod
    def _as_time(value: Any) -> datetime:
        if isinstance(value, str):  # SQLite date arithmetic answers text
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value

    # --- commands -----------------------------------------------------------------------------------------

    async def record_command(self, outcome: CommandOutcome) -> None:
        values = {"command_id": outcome.command_id, "kind": outcome.kind, "authorization_id": outcome.authorization_id,
                  "status": outcome.status, "detail": outcome.detail, "attempts": outcome.attempts,
                  "updated_at": outcome.updated_at}
        upsert = self._insert(commands).values(values)
        upsert = upsert.on_conflict_do_update(index_elements=[commands.c.command_id],
                                              set_={k: v for k, v in values.items() if k != "command_id"})

        async def apply(conn: AsyncConnection) -> None:
            await conn.execute(upsert)

        await self._write("cannot record command outcome", apply)

    async def command(self, command_id: str) -> CommandOutcome | None:
        with self._errors("cannot read command"):
            async with self._engine.connect() as conn:
                row = (await conn.execute(select(commands).where(commands.c.command_id == command_id))).first()
        if row is None:
            return None
        return CommandOutcome(row.command_id, row.kind, row.authorization_id, row.status, row.detail, row.attempts,
                              row.updated_at)

    async def reencrypt_tokens(self, *, batch_size: int = 500) -> int:
        """Re-encrypts every stored token with the first key of TOKEN_KEYS (after a rotation, before an old
        key is dropped). Returns the number of authorizations rewritten."""
        self._cipher.require_keys()
        done = 0
        after = ""
        with self._errors("cannot re-encrypt tokens"):
            while True:
                async with self._engine.begin() as conn:
                    query = (
                        select(a.c.authorization_id, a.c.access_token_encrypted, a.c.refresh_token_encrypted)
                        .where(a.c.authorization_id > after)
                        .order_by(a.c.authorization_id)
                        .limit(batch_size)
                    )
                    if not self._sqlite:
                        query = query.with_for_update()
                    rows = (await conn.execute(query)).all()
                    for row in rows:
                        await conn.execute(
                            a.update()
                            .where(a.c.authorization_id == row.authorization_id)
                            .values(access_token_encrypted=self._cipher.rotate(row.access_token_encrypted),
                                    refresh_token_encrypted=self._cipher.rotate(row.refresh_token_encrypted))
                        )
                done += len(rows)
                if len(rows) < batch_size:
                    return done
                after = rows[-1].authorization_id

    # --- reads --------------------------------------------------------------------------------------

    async def find_code_exchange(self, provider: str, auth_code: str) -> AuthorizationData | None:
        query = (
            select(*_COLUMNS)
            .join(t, t.c.authorization_id == a.c.authorization_id)
            .join(code_exchanges, (code_exchanges.c.provider == t.c.provider)
                  & (code_exchanges.c.access_token_fingerprint == t.c.access_token_fingerprint))
            .where(code_exchanges.c.code_hash == code_hash(provider, auth_code))
        )
        return await self._read_one(query, "cannot look up code exchange")

    async def get_authorization(self, key: str) -> AuthorizationData | None:
        """By authorizationId, any fingerprint it held, or referenceAgreementId; the current token's
        holder wins over a former one, a fingerprint over an agreement, then the newest."""
        if is_authorization_id(key):
            return await self._read_one(select(*_COLUMNS).where(a.c.authorization_id == key),
                                        "cannot read authorization")
        held = select(t.c.authorization_id).where(t.c.access_token_fingerprint == key)
        query = (
            select(*_COLUMNS)
            .where(or_(a.c.authorization_id.in_(held.scalar_subquery()), a.c.reference_agreement_id == key))
            .order_by(case((a.c.access_token_fingerprint == key, 0), (a.c.reference_agreement_id == key, 2), else_=1),
                      a.c.updated_at.desc())
            .limit(1)
        )
        return await self._read_one(query, "cannot read authorization")

    async def timeline(self, authorization_id: str) -> Timeline | None:
        with self._errors("cannot read authorization history"):
            async with self._engine.connect() as conn:
                row = (await conn.execute(select(*_COLUMNS).where(a.c.authorization_id == authorization_id))).first()
                if row is None:
                    return None
                tokens = (await conn.execute(
                    select(t.c.access_token_fingerprint, t.c.recorded_at)
                    .where(t.c.authorization_id == authorization_id).order_by(t.c.generation)
                )).all()
        return Timeline(
            authorization=authorization_data(row),
            tokens=[HeldToken(token.access_token_fingerprint, token.recorded_at) for token in tokens],
            activated_at=row.activated_at, expiry_warned_for=row.expiry_warned_for,
            expiry_warned_at=row.expiry_warned_at, ended_at=ended_at(row),
        )

    def _filters(self, status: str | None, merchant: str | None, provider: str | None,
                 expiring_before: datetime | None) -> list[Any]:
        where: list[Any] = []
        if status is not None:
            where.append(a.c.status == status)
        if provider is not None:
            where.append(a.c.provider == provider)
        if merchant is not None:
            where.append(or_(a.c.reference_merchant_id == merchant, a.c.auth_client_id == merchant))
        if expiring_before is not None:
            # The token that keeps it alive: its refresh token, else its access token.
            where.append(a.c.status == STATUS_ACTIVE)
            where.append(or_(
                and_(a.c.refresh_token_encrypted.is_not(None), a.c.refresh_token_expires_at < expiring_before),
                and_(a.c.refresh_token_encrypted.is_(None), a.c.access_token_expires_at < expiring_before),
            ))
        return where

    async def list_authorizations(self, *, status: str | None = None, merchant: str | None = None,
                                  provider: str | None = None,
                                  expiring_before: datetime | None = None) -> list[AuthorizationData]:
        query = (select(*_COLUMNS).where(true(), *self._filters(status, merchant, provider, expiring_before))
                 .order_by(a.c.created_at, a.c.authorization_id))
        return await self._read_all(query, "cannot list authorizations")

    async def page_authorizations(self, *, status: str | None = None, merchant: str | None = None,
                                  provider: str | None = None, expiring_before: datetime | None = None,
                                  after: tuple[datetime, str] | None = None, limit: int = 100) -> Page:
        where = self._filters(status, merchant, provider, expiring_before)
        if after is not None:
            where.append(or_(a.c.created_at > after[0], and_(a.c.created_at == after[0], a.c.authorization_id > after[1])))
        query = (select(*_COLUMNS).where(true(), *where).order_by(a.c.created_at, a.c.authorization_id)
                 .limit(limit + 1))
        with self._errors("cannot list authorizations"):
            async with self._engine.connect() as conn:
                rows: Sequence[Any] = (await conn.execute(query)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([authorization_data(row) for row in rows],
                    (rows[-1].created_at, rows[-1].authorization_id) if more and rows else None)

    async def expiring(self, *, before: datetime, token: TokenKind) -> list[AuthorizationData]:
        """Active authorizations whose access (or refresh) token expires before ``before``, soonest first."""
        if token not in ("access", "refresh"):
            raise ValueError("token must be 'access' or 'refresh'")
        column = a.c.access_token_expires_at if token == "access" else a.c.refresh_token_expires_at
        query = (
            select(*_COLUMNS)
            .where((a.c.status == STATUS_ACTIVE) & column.is_not(None) & (column < before))
            .order_by(column, a.c.authorization_id)
        )
        return await self._read_all(query, "cannot query expiring authorizations")

    async def tokens_of(self, provider: str, fingerprint: str) -> tuple[str, str | None] | None:
        """The decrypted (access token, refresh token) the holder of ``fingerprint`` has now; None when unknown."""
        self._cipher.require_keys()
        with self._errors("cannot read tokens"):
            async with self._engine.connect() as conn:
                row = (await conn.execute(self._holder_of, {"p_provider": provider,
                                                            "p_access_token_fingerprint": fingerprint})).first()
        if row is None or row.access_token_encrypted is None:
            return None
        access = self._cipher.decrypt(row.access_token_encrypted)
        refresh = self._cipher.decrypt(row.refresh_token_encrypted) if row.refresh_token_encrypted else None
        return access, refresh

    async def current_tokens(self, authorization_id: str) -> CurrentTokens | None:
        self._cipher.require_keys()
        with self._errors("cannot read tokens"):
            async with self._engine.connect() as conn:
                row = (await conn.execute(select(*_COLUMNS).where(a.c.authorization_id == authorization_id))).first()
        if row is None or row.access_token_encrypted is None:
            return None
        return self._current(row)

    def _current(self, row: Any) -> CurrentTokens:
        return CurrentTokens(
            authorization=authorization_data(row),
            access_token=self._cipher.decrypt(row.access_token_encrypted),
            refresh_token=self._cipher.decrypt(row.refresh_token_encrypted) if row.refresh_token_encrypted else None,
            access_token_expires_at=row.access_token_expires_at,
            refresh_token_expires_at=row.refresh_token_expires_at,
        )

    async def _read_one(self, query: Any, action: str) -> AuthorizationData | None:
        with self._errors(action):
            async with self._engine.connect() as conn:
                row = (await conn.execute(query)).first()
        return authorization_data(row) if row is not None else None

    async def _read_all(self, query: Any, action: str) -> list[AuthorizationData]:
        with self._errors(action):
            async with self._engine.connect() as conn:
                rows: Sequence[Any] = (await conn.execute(query)).all()
        return [authorization_data(row) for row in rows]
