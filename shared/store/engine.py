"""Engines for both back ends: SQLite (WAL, busy timeout) and PostgreSQL (asyncpg, a sized pool).

``AUTHNOTIFY_DATABASE_URL`` is read here once, for every connection the process makes: the SQLAlchemy engine
and the raw asyncpg pool of :mod:`authnotify.store.postgres` get the same host, credentials and TLS. A plain
``postgresql://`` URL means asyncpg. TLS follows libpq's URL options, ``sslmode`` (or ``ssl``):

* ``disable`` (``false``): no TLS; ``allow``, ``prefer``: TLS if the server offers it (asyncpg's default);
* ``require`` (``true``): TLS, certificate not checked (checked against ``sslrootcert`` when given);
* ``verify-ca``: TLS, the chain checked against ``sslrootcert`` (else the system CAs);
* ``verify-full``: as verify-ca, and the host name too.

``sslcert`` and ``sslkey`` give a client certificate. A value not in this list is refused, never ignored.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from authnotify.config.values import MAYBE_TLS_MODES, NO_TLS_MODES, TLS_MODES
from authnotify.errors import StoreError
from authnotify.observability.tracing import instrument_engine

SQLITE_BUSY_TIMEOUT_SECONDS = 30
POSTGRES_POOL_SIZE = 20
POSTGRES_MAX_OVERFLOW = 10
CONNECT_TIMEOUT_SECONDS = 10
COMMAND_TIMEOUT_SECONDS = 30


TLS_OPTIONS = ("sslmode", "ssl", "sslrootcert", "sslcert", "sslkey")


def parse_url(database_url: str) -> URL:
    """The URL, ``postgresql://`` read as ``postgresql+asyncpg://``; :class:`StoreError` when unusable."""
    try:
        url = make_url(database_url)
    except ArgumentError:
        raise StoreError("invalid database url") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"unsupported database {url.get_backend_name()!r} (sqlite or postgresql)")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+asyncpg")
    return url


@dataclass(frozen=True)
class PostgresTarget:
    """Where and how every PostgreSQL connection of the process goes: the URL without its TLS options, and
    the ``ssl`` argument asyncpg takes (None: asyncpg's default, which is ``prefer``)."""

    url: URL
    tls: ssl.SSLContext | str | bool | None

    def asyncpg_arguments(self) -> dict[str, Any]:
        """``asyncpg.connect``/``create_pool`` arguments for this target."""
        arguments: dict[str, Any] = {"host": self.url.host, "port": self.url.port, "user": self.url.username,
                                     "password": self.url.password, "database": self.url.database}
        if self.tls is not None:
            arguments["ssl"] = self.tls
        return {name: value for name, value in arguments.items() if value is not None}


def _query_value(url: URL, name: str) -> str | None:
    value = url.query.get(name)
    if isinstance(value, tuple):
        value = value[-1] if value else None
    return value


def postgres_target(url: URL) -> PostgresTarget:
    options = {name: _query_value(url, name) for name in TLS_OPTIONS}
    mode = (options["sslmode"] or options["ssl"] or "").strip().lower()
    bare = url.difference_update_query(TLS_OPTIONS)
    if not mode:
        tls: ssl.SSLContext | str | bool | None = None
    elif mode in NO_TLS_MODES:
        tls = False
    elif mode in MAYBE_TLS_MODES:
        tls = mode
    elif mode in TLS_MODES:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        try:
            if options["sslrootcert"]:
                context.load_verify_locations(cafile=options["sslrootcert"])
            if options["sslcert"]:
                context.load_cert_chain(options["sslcert"], options["sslkey"])
        except (OSError, ssl.SSLError) as exc:
            raise StoreError(f"database TLS files unreadable ({type(exc).__name__}: {exc.strerror or exc})") from None
        checks_chain = mode in ("verify-ca", "verify-full") or bool(options["sslrootcert"])
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED if checks_chain else ssl.CERT_NONE
        tls = context
    else:
        raise StoreError(f"invalid database url: sslmode {mode!r} (disable, allow, prefer, require, verify-ca or "
                         "verify-full)")
    return PostgresTarget(bare, tls)


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
        # WAL lets readers (the CLI, other workers) run beside the one writer.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def create_engine(database_url: str, *, pooled: bool = True) -> AsyncEngine:
    url = parse_url(database_url)
    kwargs: dict[str, Any] = {}
    if not pooled:
        kwargs["poolclass"] = NullPool
    if is_sqlite(url):
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        instrument_engine(engine)
        return engine
    if pooled:
        kwargs.update(pool_size=POSTGRES_POOL_SIZE, max_overflow=POSTGRES_MAX_OVERFLOW,
                      pool_timeout=CONNECT_TIMEOUT_SECONDS)
    target = postgres_target(url)
    connect_args: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_SECONDS, "command_timeout": COMMAND_TIMEOUT_SECONDS}
    if target.tls is not None:
        connect_args["ssl"] = target.tls
    engine = create_async_engine(target.url, connect_args=connect_args, **kwargs)
    instrument_engine(engine)  # with tracing on: a span per statement
    return engine
