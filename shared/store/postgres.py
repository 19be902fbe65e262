"""The PostgreSQL fast path of the hottest write: inserting a batch of new authorizations in one statement.

The statement is fixed and prepared, on a plain asyncpg pool: through the SQLAlchemy async layer the same
INSERT costs about ten times the CPU (greenlet hops, pool events, compilation), and ``token-created`` makes
it for every notification. Everything else goes through SQLAlchemy.

One statement does what the SQL store does in two: it claims each token in ``authorization_tokens`` (the
primary key there decides "new": a token already held, even a superseded one, is not new), then inserts an
authorization for each token it claimed. A single statement is one transaction, so neither exists without
the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from authnotify.domain.authorizations import STATUS_ACTIVE
from authnotify.errors import StoreError
from authnotify.observability.tracing import asyncpg_query_spans
from authnotify.store.engine import COMMAND_TIMEOUT_SECONDS, CONNECT_TIMEOUT_SECONDS, PostgresTarget
from authnotify.store.errors import describe
from authnotify.store.schema import authorizations

POOL_SIZE = 4

_GRANT_COLUMNS = (
    ("authorization_id", "text"),
    ("access_token_fingerprint", "text"), ("provider", "text"), ("access_token_encrypted", "bytea"),
    ("refresh_token_encrypted", "bytea"), ("access_token_expires_at", "timestamptz"),
    ("refresh_token_expires_at", "timestamptz"), ("auth_client_id", "text"), ("reference_merchant_id", "text"),
    ("reference_agreement_id", "text"), ("customer_id", "text"), ("user_login_id", "text"), ("auth_state", "text"),
    ("scopes", "text"),
)
_NOW = f"${len(_GRANT_COLUMNS) + 1}"
_INSERT_NEW_GRANTS = (
    "WITH g AS (SELECT * FROM unnest("
    + ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(_GRANT_COLUMNS, start=1))
    + ") AS g(" + ", ".join(name for name, _ in _GRANT_COLUMNS) + ")), "
    "claimed AS (INSERT INTO authorization_tokens "
    "(access_token_fingerprint, provider, authorization_id, generation, recorded_at) "
    f"SELECT g.access_token_fingerprint, g.provider, g.authorization_id, 0, {_NOW} FROM g "
    "ORDER BY g.access_token_fingerprint, g.provider "  # key order: concurrent batches never deadlock
    "ON CONFLICT (access_token_fingerprint, provider) DO NOTHING RETURNING authorization_id) "
    "INSERT INTO authorizations ("
    + ", ".join(name for name, _ in _GRANT_COLUMNS)
    + ", first_access_token_fingerprint, status, created_at, updated_at, activated_at) SELECT "
    + ", ".join(f"g.{name}::json" if name == "scopes" else f"g.{name}" for name, _ in _GRANT_COLUMNS)
    + f", g.access_token_fingerprint, '{STATUS_ACTIVE}', {_NOW}, {_NOW}, {_NOW}"
    + " FROM g JOIN claimed ON claimed.authorization_id = g.authorization_id"
    + " ORDER BY g.access_token_fingerprint, g.provider RETURNING "
    + ", ".join(column.name for column in authorizations.c)
)


class RecordRow:
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
    """The fast path sets no session state (no SET, LISTEN or advisory lock): the pool's default reset on each
    release would cost one more round trip per batch for nothing."""


def _aware(moment: datetime | None) -> datetime | None:
    """As UTCDateTime binds it: a naive time is UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


class NewGrantInserter:
    """One prepared multi-row INSERT on its own small asyncpg pool, opened on first use, to the same target
    (host, credentials, TLS) as the engine beside it."""

    def __init__(self, target: PostgresTarget, where: str) -> None:
        self._target = target
        self._where = where
        self._pool: Any = None
        self._lock = asyncio.Lock()

    async def _connection_pool(self) -> Any:
        async with self._lock:
            if self._pool is None:
                import asyncpg

                self._pool = await asyncpg.create_pool(
                    **self._target.asyncpg_arguments(), min_size=1, max_size=POOL_SIZE,
                    timeout=CONNECT_TIMEOUT_SECONDS, command_timeout=COMMAND_TIMEOUT_SECONDS,
                    reset=_keep_session, init=asyncpg_query_spans("INSERT authorizations"),
                )
            return self._pool

    async def insert(self, rows: Sequence[dict[str, Any]], now: datetime) -> dict[tuple[str, str], Any]:
        """Inserts the rows that are new (one atomic statement); returns them, by (fingerprint, provider)."""
        columns: list[list[Any]] = [[] for _ in _GRANT_COLUMNS]
        for values in rows:
            for column, (name, kind) in zip(columns, _GRANT_COLUMNS, strict=True):
                value = values[f"p_{name}"]
                if kind == "timestamptz":
                    value = _aware(value)
                elif name == "scopes" and value is not None:
                    value = orjson.dumps(value).decode()
                column.append(value)
        import asyncpg

        try:
            pool = await self._connection_pool()
            async with pool.acquire() as connection:
                records = await connection.fetch(_INSERT_NEW_GRANTS, *columns, now)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:  # not DBAPI errors: named here
            raise StoreError(f"cannot record tokens ({self._where}): {describe(exc)}") from None
        return {(record["access_token_fingerprint"], record["provider"]): RecordRow(record) for record in records}

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
