"""Every store write of a batch shares one transaction; a refused one fails alone (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from authnotify.config import TokenKeys
from authnotify.domain.authorizations import STATUS_CANCELED, Cancellation, TokenGrant
from authnotify.errors import StoreError
from authnotify.store import SqlStore
from authnotify.store.repository import CommandOutcome
from tests.conftest import fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, token_keys: TokenKeys) -> AsyncIterator[SqlStore]:
    async with fresh_database(request.param, request, tmp_path) as url:
        opened = await SqlStore.connect(url, token_keys)
        yield opened
        await opened.close()


def transactions(store: SqlStore) -> list[int]:
    """Counts the transactions the store's engine begins from now on (one item per transaction)."""
    begun: list[int] = []
    event.listen(store.engine.sync_engine, "begin", lambda _connection: begun.append(1))
    return begun


def token() -> str:
    return f"AT-{uuid.uuid4().hex}"


async def test_the_writes_of_a_batch_share_one_transaction(store: SqlStore) -> None:
    authorization_id = (await store.record_tokens(TokenGrant(provider="aps", access_token=token()))
                        ).authorization.authorizationId
    assert authorization_id is not None
    begun = transactions(store)
    now = datetime.now(UTC)

    canceled, tombstone, _ = await asyncio.gather(
        store.cancel_authorization(authorization_id, source="ACQUIRER", reason="ended"),
        store.record_cancellation(Cancellation(provider="ams", access_token=token())),
        store.record_command(CommandOutcome("cmd-1", "revocations", authorization_id, "succeeded", None, 1, now)),
    )

    assert len(begun) == 1
    assert canceled.changed and canceled.authorization.status == STATUS_CANCELED
    assert tombstone.changed and tombstone.authorization.status == STATUS_CANCELED
    command = await store.command("cmd-1")
    assert command is not None and command.status == "succeeded"


async def test_a_refused_write_fails_alone_and_the_rest_of_its_batch_is_committed(store: SqlStore) -> None:
    authorization_id = (await store.record_tokens(TokenGrant(provider="aps", access_token=token()))
                        ).authorization.authorizationId
    assert authorization_id is not None
    now = datetime.now(UTC)

    results: list[Any] = await asyncio.gather(
        store.cancel_authorization(authorization_id, source="ACQUIRER", reason="ended"),
        store.record_expiry("au_no_such_authorization", "refresh token expired"),
        store.record_command(CommandOutcome("cmd-2", "revocations", authorization_id, "succeeded", None, 1, now)),
        return_exceptions=True,
    )

    canceled, refused, _ = results
    assert isinstance(refused, StoreError) and "no authorization au_no_such_authorization" in str(refused)
    assert canceled.changed and canceled.authorization.status == STATUS_CANCELED
    found = await store.get_authorization(authorization_id)
    assert found is not None and found.status == STATUS_CANCELED
    assert await store.command("cmd-2") is not None
