"""Alembic migrations, configured in code (no alembic.ini), safe when several processes start at once.

PostgreSQL: the whole upgrade runs in one transaction holding an advisory lock, so concurrent starters
queue and all but the first find the schema at head. SQLite: an exclusive lock on ``<database>.migrate-lock``
beside the database file serialises them.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from authnotify.observability.redaction import mask_url
from authnotify.store.engine import create_engine, is_sqlite, parse_url
from authnotify.store.errors import database_errors

# Any constant works; this one spells "authnoti" so it is recognisable in pg_locks.
ADVISORY_LOCK_ID = 0x617574686E6F7469


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).resolve().parent))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _upgrade(connection: Connection) -> str:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    return MigrationContext.configure(connection).get_current_revision() or ""


@asynccontextmanager
async def _file_lock(path: Path) -> AsyncIterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # flock blocks; a thread keeps the event loop free while another process migrates.
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


async def upgrade_database(database_url: str) -> str:
    """Brings the schema to head; returns the revision the database is at afterwards."""
    url = parse_url(database_url)
    with database_errors(f"cannot migrate database at {mask_url(database_url)}"):
        engine = create_engine(database_url, pooled=False)
        try:
            if is_sqlite(url) and url.database and url.database != ":memory:":
                async with _file_lock(Path(f"{url.database}.migrate-lock")):
                    return await _upgrade_on(engine)
            return await _upgrade_on(engine)
        finally:
            await engine.dispose()


async def _upgrade_on(engine: AsyncEngine) -> str:
    async with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": ADVISORY_LOCK_ID})
        revision = await connection.run_sync(_upgrade)
        await connection.commit()
    return revision



__all__ = ["alembic_config", "head_revision", "upgrade_database"]
