"""The store: authorizations and code exchanges, and the event rules that make processing idempotent.

Every call is one short transaction of Core statements (no ORM session): a new authorization costs one
``INSERT ... ON CONFLICT DO NOTHING RETURNING``; a known one adds an ``UPDATE ... RETURNING``, whose row lock
serialises concurrent workers on PostgreSQL. So two workers handling the same notification at once never
hit a unique violation and never both see "new".
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from cryptography.fernet import InvalidToken, MultiFernet
from sqlalchemy import Row, bindparam, case, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from authnotify.config.settings import ConfigError, TokenKeys
from authnotify.domain.events import AuthorizationData, EventType, MerchantEvent, access_token_fingerprint, iso_utc
from authnotify.store.engine import create_engine, is_sqlite, parse_url
from authnotify.store.errors import StoreError, database_errors, describe, safe_url
from authnotify.store.schema import STATUS_ACTIVE, STATUS_CANCELED, authorizations, code_exchanges

ACTIVATED: EventType = "authorization.activated"
CANCELED: EventType = "authorization.canceled"


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

    def __repr__(self) -> str:  # never a raw token in a log line or a traceback
        return (f"TokenGrant(provider={self.provider!r}, "
                f"accessTokenFingerprint={access_token_fingerprint(self.access_token)!r})")


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

    def __repr__(self) -> str:
        return (f"Cancellation(provider={self.provider!r}, "
                f"accessTokenFingerprint={access_token_fingerprint(self.access_token)!r})")


@dataclass(frozen=True)
class Recorded:
    authorization: AuthorizationData
    events: list[MerchantEvent]  # what the caller must emit, already decided by the event rules


def code_hash(provider: str, auth_code: str) -> str:
    """Names an exchanged auth code without keeping it: codes are single-use, high-entropy strings."""
    return hashlib.sha256(f"{provider}\n{auth_code}".encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def authorization_data(row: Any) -> AuthorizationData:
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


def _activated(row: Any) -> MerchantEvent:
    data = authorization_data(row)
    return MerchantEvent.of(ACTIVATED, data, row.activated_at or row.created_at)


def _canceled(row: Any) -> MerchantEvent:
    data = authorization_data(row)
    return MerchantEvent.of(CANCELED, data, row.canceled_at or row.updated_at)


def _present(values: dict[str, Any]) -> dict[str, Any]:
    """Only what a message knows: an absent field never erases a known one."""
    return {key: value for key, value in values.items() if value is not None}


_PK = (authorizations.c.access_token_fingerprint, authorizations.c.provider)
# What a grant may carry: set on a new row, and filled in (never erased) on a known one.
_GRANT_FIELDS = (
    "access_token_encrypted", "refresh_token_encrypted", "access_token_expires_at", "refresh_token_expires_at",
    "auth_client_id", "reference_merchant_id", "reference_agreement_id", "customer_id", "user_login_id",
    "auth_state", "scopes",
)
_COLUMNS = tuple(authorizations.c)
_NEW_ROW = {"p_status": STATUS_ACTIVE, "p_canceled_at": None, "p_token_cancel_source": None, "p_cancel_reason": None}
# Group commit: concurrent record_tokens calls share one transaction (one commit, one WAL flush) instead of
# one each. A call that finds no flush running is flushed at once, so an idle worker adds no latency.
TOKEN_BATCH_MAX = 128
TOKEN_FLUSHES_MAX = 2  # transactions in flight: one commits while the next collects


# PostgreSQL hot path: the batch INSERT as one fixed, prepared statement on a plain asyncpg pool. Through the
# SQLAlchemy async layer the same statement costs ~10x the CPU (greenlet hops, pool events, compilation).
_RAW_GRANT_COLUMNS = (
    ("access_token_fingerprint", "text"), ("provider", "text"), ("access_token_encrypted", "bytea"),
    ("refresh_token_encrypted", "bytea"), ("access_token_expires_at", "timestamptz"),
    ("refresh_token_expires_at", "timestamptz"), ("auth_client_id", "text"), ("reference_merchant_id", "text"),
    ("reference_agreement_id", "text"), ("customer_id", "text"), ("user_login_id", "text"), ("auth_state", "text"),
    ("scopes", "text"),
)
_RAW_INSERT_TOKENS = (
    "INSERT INTO authorizations ("
    + ", ".join(name for name, _ in _RAW_GRANT_COLUMNS)
    + ", status, created_at, updated_at, activated_at) SELECT "
    + ", ".join(f"g.{name}::json" if name == "scopes" else f"g.{name}" for name, _ in _RAW_GRANT_COLUMNS)
    + f", '{STATUS_ACTIVE}', $14, $14, $14 FROM unnest("
    + ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(_RAW_GRANT_COLUMNS, start=1))
    + ") AS g(" + ", ".join(name for name, _ in _RAW_GRANT_COLUMNS) + ")"
    + " ORDER BY g.access_token_fingerprint, g.provider"  # key order: concurrent batches never deadlock
    + " ON CONFLICT (access_token_fingerprint, provider) DO NOTHING RETURNING "
    + ", ".join(column.name for column in _COLUMNS)
)
RAW_POOL_SIZE = 4


class _RecordRow:
    """An asyncpg record read like a SQLAlchemy row (``row.provider``), with JSON and times as the ORM types."""

    __slots__ = ("_record",)

    def __init__(self, record: Any) -> None:
        self._record = record

    def __getattr__(self, name: str) -> Any:
        value = self._record[name]
        if name == "scopes" and isinstance(value, str):
            return orjson.loads(value)
        return value


async def _keep_session(_connection: Any) -> None:
    """The hot path sets no session state (no SET, LISTEN or advisory lock): the pool's default reset on each
    release would cost one more round trip per batch for nothing."""


def _aware(moment: datetime | None) -> datetime | None:
    """As UTCDateTime binds it: a naive time is UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


@dataclass
class _PendingGrant:
    grant: TokenGrant
    possibly_seen_before: bool
    future: asyncio.Future[Recorded]


def _settle(future: asyncio.Future[Recorded], result: Recorded | None, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled: its message is redelivered, the effect stays
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


class Store:
    def __init__(self, engine: AsyncEngine, token_keys: TokenKeys | None, database_url: str) -> None:
        self._engine = engine
        self._token_keys = token_keys
        self._where = safe_url(database_url)
        self._insert: Callable[..., Any] = sqlite.insert if engine.dialect.name == "sqlite" else postgresql.insert
        # Each statement below is atomic on its own and rows only ever go active -> canceled, so the
        # token and cancellation paths need no BEGIN/COMMIT round trips around them.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        # Built once with bind parameters: constructing statements per call costs more than running them.
        self._insert_tokens = (
            self._insert(authorizations)
            .values({column: bindparam(f"p_{column.name}", type_=column.type) for column in _COLUMNS})
            .on_conflict_do_nothing(index_elements=list(_PK))
            .returning(*_COLUMNS)
        )
        self._update_tokens = (
            authorizations.update()
            .where((authorizations.c.provider == bindparam("p_provider"))
                   & (authorizations.c.access_token_fingerprint == bindparam("p_access_token_fingerprint")))
            .values({
                name: (bindparam("p_updated_at", type_=authorizations.c.updated_at.type) if name == "updated_at"
                       else func.coalesce(bindparam(f"p_{name}", type_=authorizations.c[name].type),
                                          authorizations.c[name]))
                for name in (*_GRANT_FIELDS, "updated_at")
            })
            .returning(*_COLUMNS)
        )
        self._pending_grants: list[_PendingGrant] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._raw_pool: Any = None  # asyncpg pool for the PostgreSQL hot path, opened on first use
        self._raw_pool_lock = asyncio.Lock()
        self._database_url = database_url

    @classmethod
    async def connect(cls, database_url: str, token_keys: TokenKeys | None, *, migrate: bool = True) -> Store:
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
        if self._flushes:  # grants already taken are committed (or failed) before the pool goes
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self._raw_pool is not None:
            await self._raw_pool.close()
            self._raw_pool = None
        await self._engine.dispose()

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    def _errors(self, action: str) -> Any:
        return database_errors(f"{action} ({self._where})")

    def _fernet(self) -> MultiFernet:
        if self._token_keys is None:
            raise ConfigError("AUTHNOTIFY_TOKEN_KEYS: required wherever tokens are stored")
        return self._token_keys.fernet

    # --- writes -------------------------------------------------------------------------------------

    async def record_tokens(self, grant: TokenGrant, *, possibly_seen_before: bool) -> Recorded:
        """Returns once the effect is committed; concurrent calls are committed together (group commit)."""
        self._fernet()  # a missing key fails this call, not a whole batch
        future: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        self._pending_grants.append(_PendingGrant(grant, possibly_seen_before, future))
        self._start_flushes()
        return await future

    def _start_flushes(self) -> None:
        while self._pending_grants and len(self._flushes) < TOKEN_FLUSHES_MAX:
            batch = self._pending_grants[:TOKEN_BATCH_MAX]
            del self._pending_grants[:TOKEN_BATCH_MAX]
            task = asyncio.create_task(self._flush_grants(batch), name="store-record-tokens")
            self._flushes.add(task)
            task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._start_flushes()

    async def _flush_grants(self, batch: list[_PendingGrant]) -> None:
        try:
            await self._flush_grants_now(batch)
        except BaseException:  # cancelled (shutdown): no caller may wait forever
            for pending in batch:
                _settle(pending.future, None, StoreError("cannot record tokens: interrupted"))
            raise

    async def _flush_grants_now(self, batch: list[_PendingGrant]) -> None:
        try:
            with self._errors("cannot record tokens"):
                outcomes = await self._upsert_tokens_many([pending.grant for pending in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].future, None, exc)
                return
            # One bad grant (or a deadlock, or a lost connection) must not fail the others: each is
            # retried alone, so an error lands on its own message only.
        else:
            for pending, (row, created) in zip(batch, outcomes, strict=True):
                _settle(pending.future, self._recorded_tokens(row, created, pending.possibly_seen_before), None)
            return
        for pending in batch:
            try:
                result = await self._record_tokens_alone(pending.grant, pending.possibly_seen_before)
            except Exception as exc:
                _settle(pending.future, None, exc)
            else:
                _settle(pending.future, result, None)

    async def _upsert_tokens_many(self, grants: Sequence[TokenGrant]) -> list[tuple[Row[Any], bool]]:
        """Every grant in one INSERT (one commit), with the same outcome as recording them one by one."""
        fernet = self._fernet()
        now = _now()
        params = [self._token_params(grant, fernet, now) for grant in grants]
        keys = [(p["p_access_token_fingerprint"], p["p_provider"]) for p in params]
        first: dict[tuple[str, str], int] = {}
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        outcomes: list[tuple[Row[Any], bool] | None] = [None] * len(grants)
        # One multi-row INSERT is atomic on its own: committed once, with no BEGIN/COMMIT round trips; the
        # few updates after it are single atomic statements too, exactly as record_tokens alone makes them.
        new_rows = [(params[index], index) for _, index in sorted(first.items())]
        if self._engine.dialect.name == "postgresql":
            inserted = await self._insert_grants_raw([values for values, _ in new_rows], now)
        else:
            with self._errors("cannot record tokens"):
                async with self._autocommit.connect() as conn:
                    result = await conn.execute(
                        self._insert_tokens,
                        [{**values, **_NEW_ROW, "p_created_at": now, "p_activated_at": now} for values, _ in new_rows],
                    )
                    inserted = {(row.access_token_fingerprint, row.provider): row for row in result.all()}
        updates: list[int] = []
        for index in range(len(grants)):
            if first[keys[index]] == index and keys[index] in inserted:
                outcomes[index] = (inserted[keys[index]], True)
            else:  # known before this batch, or a repeat within it: filled in after, status stays
                updates.append(index)
        if updates:
            async with self._autocommit.connect() as conn:
                # Key order: concurrent batches lock rows in the same order, never deadlock.
                for index in sorted(updates, key=lambda i: (keys[i], i)):
                    row = (await conn.execute(self._update_tokens, params[index])).first()
                    if row is None:  # pragma: no cover - rows are never deleted
                        raise StoreError("authorization vanished while recording tokens")
                    outcomes[index] = (row, False)
        return [outcome for outcome in outcomes if outcome is not None]

    async def _raw(self) -> Any:
        async with self._raw_pool_lock:
            if self._raw_pool is None:
                import asyncpg

                from authnotify.store.engine import COMMAND_TIMEOUT_SECONDS, CONNECT_TIMEOUT_SECONDS

                url = self._engine.url.set(drivername="postgresql")
                self._raw_pool = await asyncpg.create_pool(
                    url.render_as_string(hide_password=False), min_size=1, max_size=RAW_POOL_SIZE,
                    timeout=CONNECT_TIMEOUT_SECONDS, command_timeout=COMMAND_TIMEOUT_SECONDS,
                    reset=_keep_session,
                )
            return self._raw_pool

    async def _insert_grants_raw(self, params: Sequence[dict[str, Any]], now: datetime) -> dict[tuple[str, str], Any]:
        """One INSERT of every new grant (atomic, one commit); returns the rows it created, by key."""
        columns: list[list[Any]] = [[] for _ in _RAW_GRANT_COLUMNS]
        for values in params:
            for column, (name, kind) in zip(columns, _RAW_GRANT_COLUMNS, strict=True):
                value = values[f"p_{name}"]
                if kind == "timestamptz":
                    value = _aware(value)
                elif name == "scopes" and value is not None:
                    value = orjson.dumps(value).decode()
                column.append(value)
        import asyncpg

        try:
            pool = await self._raw()
            async with pool.acquire() as connection:
                records = await connection.fetch(_RAW_INSERT_TOKENS, *columns, now)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # not DBAPI errors: name them here
            raise StoreError(f"cannot record tokens ({self._where}): {describe(exc)}") from None
        return {(record["access_token_fingerprint"], record["provider"]): _RecordRow(record) for record in records}

    async def _record_tokens_alone(self, grant: TokenGrant, possibly_seen_before: bool) -> Recorded:
        fernet = self._fernet()
        with self._errors("cannot record tokens"):
            async with self._autocommit.connect() as conn:
                row, created = await self._upsert_tokens(conn, grant, fernet)
        return self._recorded_tokens(row, created, possibly_seen_before)

    async def record_code_exchange(
        self, provider: str, auth_code: str, grant: TokenGrant, *, possibly_seen_before: bool
    ) -> Recorded:
        fernet = self._fernet()
        now = _now()
        with self._errors("cannot record code exchange"):
            async with self._engine.begin() as conn:
                row, created = await self._upsert_tokens(conn, grant, fernet, now)
                await conn.execute(
                    self._insert(code_exchanges)
                    .values(
                        code_hash=code_hash(provider, auth_code),
                        provider=row.provider,
                        access_token_fingerprint=row.access_token_fingerprint,
                        exchanged_at=now,
                    )
                    .on_conflict_do_nothing(index_elements=[code_exchanges.c.code_hash])
                )
        return self._recorded_tokens(row, created, possibly_seen_before)

    async def record_cancellation(self, cancel: Cancellation, *, possibly_seen_before: bool) -> Recorded:
        fernet = self._fernet()
        fingerprint = access_token_fingerprint(cancel.access_token)
        now = _now()
        known = _present({
            "auth_client_id": cancel.auth_client_id,
            "reference_merchant_id": cancel.reference_merchant_id,
            "user_login_id": cancel.user_login_id,
        })
        cancel_fields = {"token_cancel_source": cancel.token_cancel_source, "cancel_reason": cancel.reason}
        pk = (authorizations.c.provider == cancel.provider) & (authorizations.c.access_token_fingerprint == fingerprint)
        with self._errors("cannot record cancellation"):
            async with self._autocommit.connect() as conn:
                # No row yet: a tombstone, so a TOKEN_CREATED that arrives later cannot activate it.
                tombstone = (
                    self._insert(authorizations)
                    .values(
                        provider=cancel.provider,
                        access_token_fingerprint=fingerprint,
                        status=STATUS_CANCELED,
                        access_token_encrypted=fernet.encrypt(cancel.access_token.encode()),
                        created_at=now,
                        updated_at=now,
                        canceled_at=now,
                        **known,
                        **cancel_fields,
                    )
                    .on_conflict_do_nothing(index_elements=list(_PK))
                    .returning(*_COLUMNS)
                )
                row = (await conn.execute(tombstone)).first()
                if row is not None:
                    return Recorded(authorization_data(row), [_canceled(row)])
                cancel_active = (
                    authorizations.update()
                    .where(pk & (authorizations.c.status == STATUS_ACTIVE))
                    .values(status=STATUS_CANCELED, canceled_at=now, updated_at=now, **known, **cancel_fields)
                    .returning(*_COLUMNS)
                )
                row = (await conn.execute(cancel_active)).first()
                if row is not None:
                    return Recorded(authorization_data(row), [_canceled(row)])
                # Already canceled: the first cancellation's facts and time stand.
                row = (await conn.execute(select(*_COLUMNS).where(pk))).first()
        if row is None:  # pragma: no cover - rows are never deleted
            raise StoreError("authorization vanished while recording a cancellation")
        return Recorded(authorization_data(row), [_canceled(row)] if possibly_seen_before else [])

    @staticmethod
    def _token_params(grant: TokenGrant, fernet: MultiFernet, now: datetime) -> dict[str, Any]:
        return {
            "p_provider": grant.provider,
            "p_access_token_fingerprint": access_token_fingerprint(grant.access_token),
            "p_access_token_encrypted": fernet.encrypt(grant.access_token.encode()),
            "p_refresh_token_encrypted": fernet.encrypt(grant.refresh_token.encode()) if grant.refresh_token else None,
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

    async def _upsert_tokens(
        self, conn: AsyncConnection, grant: TokenGrant, fernet: MultiFernet, now: datetime | None = None
    ) -> tuple[Row[Any], bool]:
        now = now or _now()
        params = self._token_params(grant, fernet, now)
        row = (await conn.execute(self._insert_tokens, {
            **params, **_NEW_ROW, "p_created_at": now, "p_activated_at": now,
        })).first()
        if row is not None:
            return row, True
        # Known (active, or a cancellation tombstone): fill in what this grant knows; status stays.
        row = (await conn.execute(self._update_tokens, params)).first()
        if row is None:  # pragma: no cover - rows are never deleted
            raise StoreError("authorization vanished while recording tokens")
        return row, False

    @staticmethod
    def _recorded_tokens(row: Any, created: bool, possibly_seen_before: bool) -> Recorded:
        data = authorization_data(row)
        if row.status != STATUS_ACTIVE:
            return Recorded(data, [])  # canceled stays canceled: never an activation for it
        if created or possibly_seen_before:
            return Recorded(data, [_activated(row)])
        return Recorded(data, [])

    async def reencrypt_tokens(self, *, batch_size: int = 500) -> int:
        """Re-encrypts every stored token with the first key of TOKEN_KEYS (after a rotation, before an old
        key is dropped). Returns the number of authorizations rewritten."""
        fernet = self._fernet()
        done = 0
        after: tuple[str, str] = ("", "")
        with self._errors("cannot re-encrypt tokens"):
            while True:
                async with self._engine.begin() as conn:
                    query = (
                        select(*_PK, authorizations.c.access_token_encrypted, authorizations.c.refresh_token_encrypted)
                        .where(or_(authorizations.c.access_token_fingerprint > after[0],
                                   (authorizations.c.access_token_fingerprint == after[0])
                                   & (authorizations.c.provider > after[1])))
                        .order_by(*_PK)
                        .limit(batch_size)
                    )
                    if not is_sqlite(self._engine.url):
                        query = query.with_for_update()
                    rows = (await conn.execute(query)).all()
                    for row in rows:
                        values = {
                            "access_token_encrypted": self._rotate(fernet, row.access_token_encrypted),
                            "refresh_token_encrypted": self._rotate(fernet, row.refresh_token_encrypted),
                        }
                        await conn.execute(
                            authorizations.update()
                            .where((authorizations.c.provider == row.provider)
                                   & (authorizations.c.access_token_fingerprint == row.access_token_fingerprint))
                            .values(**values)
                        )
                done += len(rows)
                if len(rows) < batch_size:
                    return done
                after = (rows[-1].access_token_fingerprint, rows[-1].provider)

    @staticmethod
    def _rotate(fernet: MultiFernet, ciphertext: bytes | None) -> bytes | None:
        if ciphertext is None:
            return None
        try:
            return fernet.rotate(ciphertext)
        except InvalidToken:
            raise StoreError("a stored token does not decrypt with any key of AUTHNOTIFY_TOKEN_KEYS") from None

    # --- reads --------------------------------------------------------------------------------------

    async def find_code_exchange(self, provider: str, auth_code: str) -> AuthorizationData | None:
        query = (
            select(*_COLUMNS)
            .join(code_exchanges, (code_exchanges.c.provider == authorizations.c.provider)
                  & (code_exchanges.c.access_token_fingerprint == authorizations.c.access_token_fingerprint))
            .where(code_exchanges.c.code_hash == code_hash(provider, auth_code))
        )
        with self._errors("cannot look up code exchange"):
            async with self._engine.connect() as conn:
                row = (await conn.execute(query)).first()
        return authorization_data(row) if row is not None else None

    async def get_authorization(self, key: str) -> AuthorizationData | None:
        """By accessTokenFingerprint or referenceAgreementId; a fingerprint match wins, then the newest."""
        fingerprint_match = authorizations.c.access_token_fingerprint == key
        query = (
            select(*_COLUMNS)
            .where(or_(fingerprint_match, authorizations.c.reference_agreement_id == key))
            .order_by(case((fingerprint_match, 0), else_=1), authorizations.c.updated_at.desc())
            .limit(1)
        )
        with self._errors("cannot read authorization"):
            async with self._engine.connect() as conn:
                row = (await conn.execute(query)).first()
        return authorization_data(row) if row is not None else None

    async def list_authorizations(
        self, *, status: str | None = None, merchant: str | None = None
    ) -> list[AuthorizationData]:
        query = select(*_COLUMNS).order_by(authorizations.c.created_at, *_PK)
        if status is not None:
            query = query.where(authorizations.c.status == status)
        if merchant is not None:
            query = query.where(or_(authorizations.c.reference_merchant_id == merchant,
                                    authorizations.c.auth_client_id == merchant))
        return await self._read_all(query, "cannot list authorizations")

    async def expiring(self, *, before: datetime, token: Literal["access", "refresh"]) -> list[AuthorizationData]:
        """Active authorizations whose access (or refresh) token expires before ``before``, soonest first."""
        if token not in ("access", "refresh"):
            raise ValueError("token must be 'access' or 'refresh'")
        column = (authorizations.c.access_token_expires_at if token == "access"
                  else authorizations.c.refresh_token_expires_at)
        query = (
            select(*_COLUMNS)
            .where((authorizations.c.status == STATUS_ACTIVE) & column.is_not(None) & (column < before))
            .order_by(column, *_PK)
        )
        return await self._read_all(query, "cannot query expiring authorizations")

    async def tokens_of(self, provider: str, fingerprint: str) -> tuple[str, str | None] | None:
        """The decrypted (access token, refresh token), for refresh or revoke work; None when unknown."""
        fernet = self._fernet()
        query = select(authorizations.c.access_token_encrypted, authorizations.c.refresh_token_encrypted).where(
            (authorizations.c.provider == provider) & (authorizations.c.access_token_fingerprint == fingerprint)
        )
        with self._errors("cannot read tokens"):
            async with self._engine.connect() as conn:
                row = (await conn.execute(query)).first()
        if row is None or row.access_token_encrypted is None:
            return None
        try:
            access = fernet.decrypt(row.access_token_encrypted).decode()
            refresh = fernet.decrypt(row.refresh_token_encrypted).decode() if row.refresh_token_encrypted else None
        except InvalidToken:
            raise StoreError(
                f"tokens of {provider}/{fingerprint} do not decrypt with any key of AUTHNOTIFY_TOKEN_KEYS"
            ) from None
        return access, refresh

    async def _read_all(self, query: Any, action: str) -> list[AuthorizationData]:
        with self._errors(action):
            async with self._engine.connect() as conn:
                rows: Sequence[Any] = (await conn.execute(query)).all()
        return [authorization_data(row) for row in rows]
