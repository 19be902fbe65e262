"""The store on SQLite or PostgreSQL: authorizations (tokens encrypted) and exchanged auth codes (hashed).

Every write is short and idempotent, made of Core statements (no ORM session). Recording grants goes one
way, whatever the caller: a multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` creates the new
authorizations, then an ``UPDATE ... RETURNING`` per known one fills in what it lacks, in key order, so
concurrent writers never deadlock, never hit a unique violation and never both see "new". Concurrent
``record_tokens`` calls share that write (:mod:`authnotify.store.group_commit`); on PostgreSQL its INSERT
takes the fast path of :mod:`authnotify.store.postgres`.

Rows only ever go active -> canceled, and each statement is atomic on its own, so the token and
cancellation paths need no BEGIN/COMMIT round trips; the code exchange, which writes two tables, has one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, case, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from authnotify.config import TokenKeys
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
from authnotify.observability.redaction import mask_url
from authnotify.store.encryption import TokenCipher
from authnotify.store.engine import create_engine, is_sqlite, parse_url, postgres_target
from authnotify.store.errors import database_errors
from authnotify.store.group_commit import GroupCommit
from authnotify.store.postgres import NewGrantInserter
from authnotify.store.repository import TokenKind, authorization_data
from authnotify.store.schema import authorizations, code_exchanges

_PK = (authorizations.c.access_token_fingerprint, authorizations.c.provider)
_COLUMNS = tuple(authorizations.c)
# What a grant may carry: set on a new row, and filled in (never erased) on a known one.
_GRANT_FIELDS = (
    "access_token_encrypted", "refresh_token_encrypted", "access_token_expires_at", "refresh_token_expires_at",
    "auth_client_id", "reference_merchant_id", "reference_agreement_id", "customer_id", "user_login_id",
    "auth_state", "scopes",
)
_NEW_ROW = {"p_status": STATUS_ACTIVE, "p_canceled_at": None, "p_token_cancel_source": None, "p_cancel_reason": None}


def _now() -> datetime:
    return datetime.now(UTC)


def _granted(row: Any, created: bool) -> Transition:
    return Transition(authorization_data(row), created, row.activated_at or row.created_at)


def _canceled(row: Any, changed: bool) -> Transition:
    return Transition(authorization_data(row), changed, row.canceled_at or row.updated_at)


def _present(values: dict[str, Any]) -> dict[str, Any]:
    """Only what a message knows: an absent field never erases a known one."""
    return {key: value for key, value in values.items() if value is not None}


class SqlStore:
    def __init__(self, engine: AsyncEngine, token_keys: TokenKeys | None, database_url: str) -> None:
        self._engine = engine
        self._cipher = TokenCipher(token_keys)
        self._where = mask_url(database_url)
        self._insert: Callable[..., Any] = sqlite.insert if engine.dialect.name == "sqlite" else postgresql.insert
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        # Built once with bind parameters: constructing statements per call costs more than running them.
        self._insert_grants = (
            self._insert(authorizations)
            .values({column: bindparam(f"p_{column.name}", type_=column.type) for column in _COLUMNS})
            .on_conflict_do_nothing(index_elements=list(_PK))
            .returning(*_COLUMNS)
        )
        self._fill_in_grant = (
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
        self._fast_insert = (NewGrantInserter(postgres_target(parse_url(database_url)), self._where)
                             if engine.dialect.name == "postgresql" else None)
        self._grants: GroupCommit[TokenGrant, Transition] = GroupCommit(self._record_grants,
                                                                        name="store-record-tokens")

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
        if self._fast_insert is not None:
            await self._fast_insert.close()
        await self._engine.dispose()

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return database_errors(f"{action} ({self._where})")

    # --- writes -------------------------------------------------------------------------------------

    async def record_tokens(self, grant: TokenGrant) -> Transition:
        """Returns once the effect is committed; concurrent calls are committed together (group commit)."""
        self._cipher.require_keys()  # a missing key fails this call, not a whole batch
        return await self._grants.submit(grant)

    async def _record_grants(self, grants: Sequence[TokenGrant]) -> list[Transition]:
        with self._errors("cannot record tokens"):
            async with self._autocommit.connect() as conn:
                return await self._write_grants(conn, grants, _now(), fast=True)

    async def record_code_exchange(self, provider: str, auth_code: str, grant: TokenGrant) -> Transition:
        now = _now()
        with self._errors("cannot record code exchange"):
            async with self._engine.begin() as conn:
                (transition,) = await self._write_grants(conn, [grant], now, fast=False)
                await conn.execute(
                    self._insert(code_exchanges)
                    .values(
                        code_hash=code_hash(provider, auth_code),
                        provider=provider,
                        access_token_fingerprint=transition.authorization.accessTokenFingerprint,
                        exchanged_at=now,
                    )
                    .on_conflict_do_nothing(index_elements=[code_exchanges.c.code_hash])
                )
        return transition

    async def _write_grants(self, conn: AsyncConnection, grants: Sequence[TokenGrant], now: datetime, *,
                            fast: bool) -> list[Transition]:
        """Every grant in one INSERT, then the known ones filled in: the same outcome as one by one.

        ``fast``: the INSERT may take PostgreSQL's fast path (outside ``conn``'s transaction, so only when
        ``conn`` commits each statement on its own anyway).
        """
        params = [self._grant_params(grant, now) for grant in grants]
        keys = [(p["p_access_token_fingerprint"], p["p_provider"]) for p in params]
        first: dict[tuple[str, str], int] = {}
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        new_rows = [params[index] for index in sorted(first.values())]
        if fast and self._fast_insert is not None:
            inserted = await self._fast_insert.insert(new_rows, now)
        else:
            result = await conn.execute(
                self._insert_grants,
                [{**values, **_NEW_ROW, "p_created_at": now, "p_activated_at": now} for values in new_rows],
            )
            inserted = {(row.access_token_fingerprint, row.provider): row for row in result.all()}
        transitions: list[Transition | None] = [None] * len(grants)
        known: list[int] = []
        for index, key in enumerate(keys):
            if first[key] == index and key in inserted:
                transitions[index] = _granted(inserted[key], created=True)
            else:  # known before this batch, or a repeat within it: filled in after, status stays
                known.append(index)
        # Key order: concurrent batches lock rows in the same order, never deadlock.
        for index in sorted(known, key=lambda i: (keys[i], i)):
            row = (await conn.execute(self._fill_in_grant, params[index])).first()
            if row is None:  # pragma: no cover - rows are never deleted
                raise StoreError("authorization vanished while recording tokens")
            transitions[index] = _granted(row, created=False)
        return [transition for transition in transitions if transition is not None]

    def _grant_params(self, grant: TokenGrant, now: datetime) -> dict[str, Any]:
        return {
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
                        access_token_encrypted=encrypted_token,
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
                    return _canceled(row, changed=True)
                cancel_active = (
                    authorizations.update()
                    .where(pk & (authorizations.c.status == STATUS_ACTIVE))
                    .values(status=STATUS_CANCELED, canceled_at=now, updated_at=now, **known, **cancel_fields)
                    .returning(*_COLUMNS)
                )
                row = (await conn.execute(cancel_active)).first()
                if row is not None:
                    return _canceled(row, changed=True)
                # Already canceled: the first cancellation's facts and time stand.
                row = (await conn.execute(select(*_COLUMNS).where(pk))).first()
        if row is None:  # pragma: no cover - rows are never deleted
            raise StoreError("authorization vanished while recording a cancellation")
        return _canceled(row, changed=False)

    async def reencrypt_tokens(self, *, batch_size: int = 500) -> int:
        """Re-encrypts every stored token with the first key of TOKEN_KEYS (after a rotation, before an old
        key is dropped). Returns the number of authorizations rewritten."""
        self._cipher.require_keys()
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
                        await conn.execute(
                            authorizations.update()
                            .where((authorizations.c.provider == row.provider)
                                   & (authorizations.c.access_token_fingerprint == row.access_token_fingerprint))
                            .values(access_token_encrypted=self._cipher.rotate(row.access_token_encrypted),
                                    refresh_token_encrypted=self._cipher.rotate(row.refresh_token_encrypted))
                        )
                done += len(rows)
                if len(rows) < batch_size:
                    return done
                after = (rows[-1].access_token_fingerprint, rows[-1].provider)

    # --- reads --------------------------------------------------------------------------------------

    async def find_code_exchange(self, provider: str, auth_code: str) -> AuthorizationData | None:
        query = (
            select(*_COLUMNS)
            .join(code_exchanges, (code_exchanges.c.provider == authorizations.c.provider)
                  & (code_exchanges.c.access_token_fingerprint == authorizations.c.access_token_fingerprint))
            .where(code_exchanges.c.code_hash == code_hash(provider, auth_code))
        )
        return await self._read_one(query, "cannot look up code exchange")

    async def get_authorization(self, key: str) -> AuthorizationData | None:
        """By accessTokenFingerprint or referenceAgreementId; a fingerprint match wins, then the newest."""
        fingerprint_match = authorizations.c.access_token_fingerprint == key
        query = (
            select(*_COLUMNS)
            .where(or_(fingerprint_match, authorizations.c.reference_agreement_id == key))
            .order_by(case((fingerprint_match, 0), else_=1), authorizations.c.updated_at.desc())
            .limit(1)
        )
        return await self._read_one(query, "cannot read authorization")

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

    async def expiring(self, *, before: datetime, token: TokenKind) -> list[AuthorizationData]:
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
        self._cipher.require_keys()
        query = select(authorizations.c.access_token_encrypted, authorizations.c.refresh_token_encrypted).where(
            (authorizations.c.provider == provider) & (authorizations.c.access_token_fingerprint == fingerprint)
        )
        with self._errors("cannot read tokens"):
            async with self._engine.connect() as conn:
                row = (await conn.execute(query)).first()
        if row is None or row.access_token_encrypted is None:
            return None
        access = self._cipher.decrypt(row.access_token_encrypted)
        refresh = self._cipher.decrypt(row.refresh_token_encrypted) if row.refresh_token_encrypted else None
        return access, refresh

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
