"""The store's lifecycle, on SQLite, PostgreSQL and the in-memory twin: identity and token history, refresh
claims, expiry, revocation, the scheduler's claims, pages and commands; and migration 0002 over 0001's rows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from authnotify.config import TokenKeys
from authnotify.domain.authorizations import Cancellation, TokenGrant, access_token_fingerprint
from authnotify.domain.events import (
    activation_events,
    cancellation_events,
    expiry_events,
    history,
    refresh_events,
    webhook_id,
)
from authnotify.store import SqlStore
from authnotify.store.engine import create_engine
from authnotify.store.memory import InMemoryStore
from authnotify.store.migrations import alembic_config
from authnotify.store.repository import (
    AuthorizationStore,
    ClaimOutcome,
    CommandOutcome,
    DueWorkDone,
    Schedule,
)
from authnotify.store.schema import Base
from tests.conftest import fresh_database

NOW = datetime.now(UTC).replace(microsecond=0)
SCHEDULE = Schedule(refresh_before=timedelta(hours=24), expiry_warning=timedelta(days=7),
                    pending=timedelta(hours=3), lease=timedelta(minutes=2))


def token(kind: str = "AT") -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def grant(access: str, **fields: object) -> TokenGrant:
    values: dict[str, object] = {
        "provider": "aps", "access_token": access, "refresh_token": token("RT"),
        "access_token_expiry_time": NOW + timedelta(days=30), "refresh_token_expiry_time": NOW + timedelta(days=180),
        "auth_client_id": "CLIENT-1", "reference_merchant_id": "M-1", "reference_agreement_id": f"agr-{access[-8:]}",
    }
    values.update(fields)
    return TokenGrant(**values)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgresql", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, token_keys: TokenKeys) -> AsyncIterator[
        AuthorizationStore]:
    if request.param == "memory":
        yield InMemoryStore()
        return
    async with fresh_database(request.param, request, tmp_path) as url:
        opened = await SqlStore.connect(url, token_keys)
        yield opened
        await opened.close()


async def refreshed(store: AuthorizationStore, authorization_id: str, old: str, **fields: object):  # type: ignore[no-untyped-def]
    new_access = token()
    claim = await store.claim_refresh(authorization_id, access_token_fingerprint(old),
                                      until=datetime.now(UTC) + timedelta(seconds=30))
    assert claim.outcome is ClaimOutcome.CLAIMED
    transition = await store.record_refresh(authorization_id, access_token_fingerprint(old),
                                            grant(new_access, **fields))
    return new_access, transition


# --- identity and history ------------------------------------------------------------------------------


async def test_an_authorization_keeps_its_id_and_every_fingerprint_it_held(store: AuthorizationStore) -> None:
    first = token()
    created = await store.record_tokens(grant(first))
    authorization_id = created.authorization.authorizationId
    assert authorization_id and authorization_id.startswith("auth_") and len(authorization_id) <= 40
    [activated] = activation_events(created, possibly_seen_before=False)

    second, transition = await refreshed(store, authorization_id, first)
    assert transition.changed and transition.authorization.authorizationId == authorization_id
    assert transition.authorization.accessTokenFingerprint == access_token_fingerprint(second)
    [event] = refresh_events(transition, possibly_seen_before=False)
    assert event.type == "authorization.refreshed" and event.id == webhook_id("aps", access_token_fingerprint(second),
                                                                              "authorization.refreshed")
    # Any key finds it: its id, its first and its current fingerprint, its agreement.
    for key in (authorization_id, access_token_fingerprint(first), access_token_fingerprint(second),
                created.authorization.referenceAgreementId or ""):
        found = await store.get_authorization(key)
        assert found is not None and found.authorizationId == authorization_id, key
    held = await store.tokens_of("aps", access_token_fingerprint(first))  # the holder's tokens now
    assert held is not None and held[0] == second

    # A TOKEN_CREATED redelivered with the superseded token makes no second authorization and changes nothing.
    again = await store.record_tokens(grant(first))
    assert not again.changed and again.authorization.authorizationId == authorization_id
    assert again.authorization.accessTokenFingerprint == access_token_fingerprint(second)
    [re_emitted] = activation_events(again, possibly_seen_before=True)
    assert re_emitted.id == activated.id  # the activation keeps the id of the first token
    assert len(await store.list_authorizations()) == 1

    timeline = await store.timeline(authorization_id)
    assert timeline is not None
    assert [(entry.type, entry.accessTokenFingerprint) for entry in history(timeline)] == [
        ("authorization.activated", access_token_fingerprint(first)),
        ("authorization.refreshed", access_token_fingerprint(second))]
    assert [entry.id for entry in history(timeline)] == [activated.id, event.id]


async def test_a_cancellation_carrying_a_superseded_token_cancels_the_authorization(store: AuthorizationStore) -> None:
    first = token()
    created = await store.record_tokens(grant(first))
    authorization_id = created.authorization.authorizationId
    assert authorization_id is not None
    await refreshed(store, authorization_id, first)

    canceled = await store.record_cancellation(Cancellation(provider="aps", access_token=first,
                                                            token_cancel_source="PSP", reason="unbound"))
    assert canceled.changed and canceled.authorization.authorizationId == authorization_id
    assert canceled.authorization.status == "canceled"
    [event] = cancellation_events(canceled, possibly_seen_before=False)
    assert event.data.reason == "unbound"
    assert len(await store.list_authorizations()) == 1


async def test_the_refresh_claim_is_held_by_one_and_ends_once_the_token_moved_on(store: AuthorizationStore) -> None:
    first = token()
    authorization_id = (await store.record_tokens(grant(first))).authorization.authorizationId
    assert authorization_id is not None
    fingerprint = access_token_fingerprint(first)
    until = datetime.now(UTC) + timedelta(seconds=30)

    claims = await asyncio.gather(*(store.claim_refresh(authorization_id, fingerprint, until=until) for _ in range(4)))
    assert sorted(c.outcome.value for c in claims) == ["busy", "busy", "busy", "claimed"]
    [claimed] = [c for c in claims if c.outcome is ClaimOutcome.CLAIMED]
    assert claimed.tokens is not None and claimed.tokens.refresh_token is not None

    await store.release_refresh(authorization_id, request_done=False)
    second, _ = await refreshed(store, authorization_id, first)
    moved = await store.claim_refresh(authorization_id, fingerprint, until=until)
    assert moved.outcome is ClaimOutcome.MOVED_ON
    replaced = await store.refresh_after(authorization_id, fingerprint)
    assert replaced is not None and replaced.token_fingerprint == access_token_fingerprint(second)
    assert (await store.claim_refresh("auth_nonexistent", fingerprint, until=until)).outcome is ClaimOutcome.UNKNOWN


async def test_an_authorization_expires_once_and_is_then_left_alone(store: AuthorizationStore) -> None:
    access = token()
    authorization_id = (await store.record_tokens(grant(access))).authorization.authorizationId
    assert authorization_id is not None

    first = await store.record_expiry(authorization_id, "the refresh was refused: applyToken answered F X")
    second = await store.record_expiry(authorization_id, "another reason")
    assert first.changed and not second.changed
    assert second.authorization.status == "expired" and second.authorization.reason == first.authorization.reason
    assert expiry_events(second, possibly_seen_before=False) == []
    assert expiry_events(second, possibly_seen_before=True) == expiry_events(first, possibly_seen_before=False)
    # Neither a revocation nor a wallet-side cancellation brings it back or changes it.
    assert not (await store.cancel_authorization(authorization_id, source="ACQUIRER", reason="x")).changed
    assert not (await store.record_cancellation(Cancellation(provider="aps", access_token=access))).changed
    assert [a.status for a in await store.list_authorizations(status="expired")] == ["expired"]
    found = await store.claim_refresh(authorization_id, access_token_fingerprint(access),
                                      until=datetime.now(UTC) + timedelta(seconds=5))
    assert found.outcome is ClaimOutcome.ENDED


async def test_a_revocation_cancels_an_active_one_once(store: AuthorizationStore) -> None:
    authorization_id = (await store.record_tokens(grant(token()))).authorization.authorizationId
    assert authorization_id is not None
    first = await store.cancel_authorization(authorization_id, source="ACQUIRER", reason="merchant ended it")
    again = await store.cancel_authorization(authorization_id, source="ACQUIRER", reason="twice")
    assert first.changed and not again.changed
    assert again.authorization.tokenCancelSource == "ACQUIRER" and again.authorization.reason == "merchant ended it"
    assert cancellation_events(again, possibly_seen_before=True)[0].to_json() == \
        cancellation_events(first, possibly_seen_before=False)[0].to_json()


# --- the scheduler's claims ------------------------------------------------------------------------------


async def test_due_work_is_claimed_once_published_once_and_released_when_a_publish_fails(
        store: AuthorizationStore) -> None:
    due_refresh = await store.record_tokens(grant(token(), access_token_expiry_time=NOW + timedelta(hours=2)))
    due_warning = await store.record_tokens(grant(token(), refresh_token_expiry_time=NOW + timedelta(days=3)))
    expired_access = await store.record_tokens(grant(token(), refresh_token=None,
                                                     access_token_expiry_time=NOW - timedelta(minutes=1)))
    await store.record_tokens(grant(token()))  # nothing due for a month
    await store.record_tokens(grant(token(), access_token_expiry_time=None, refresh_token_expiry_time=None))

    # Two schedulers at once: each authorization goes to one of them.
    first, second = await asyncio.gather(store.claim_due_work(SCHEDULE, limit=10),
                                         store.claim_due_work(SCHEDULE, limit=10))
    claimed = {w.authorization.authorizationId: w for w in [*first, *second]}
    assert len(claimed) == len(first) + len(second) == 3
    assert claimed[due_refresh.authorization.authorizationId].refresh
    assert claimed[due_refresh.authorization.authorizationId].warn_for is None
    assert claimed[due_warning.authorization.authorizationId].warn_for == NOW + timedelta(days=3)
    assert claimed[expired_access.authorization.authorizationId].refresh  # the request will expire it
    assert await store.claim_due_work(SCHEDULE, limit=10) == []  # held by the leases

    # The refresh and the expiry request were confirmed; the warning's publish failed.
    await store.finish_due_work([DueWorkDone(w, refresh_published=w.refresh, warning_published=False)
                                 for w in claimed.values()])
    [again] = await store.claim_due_work(SCHEDULE, limit=10)  # only the warning is due again
    assert again.authorization.authorizationId == due_warning.authorization.authorizationId and not again.refresh
    await store.finish_due_work([DueWorkDone(again, refresh_published=False, warning_published=True)])
    assert await store.claim_due_work(SCHEDULE, limit=10) == []
    stats = await store.lifecycle_stats(SCHEDULE)
    assert stats.by_status == {"active": 5} and stats.oldest_due is None
    assert stats.expiring[("access", "24h")] == 1 and stats.expiring[("refresh", "7d")] == 1

    timeline = await store.timeline(due_warning.authorization.authorizationId or "")
    assert timeline is not None and [e.type for e in history(timeline)][-1] == "authorization.expiring"


async def test_a_refresh_attempt_that_failed_keeps_its_request_pending_until_answered(
        store: AuthorizationStore) -> None:
    due = await store.record_tokens(grant(token(), access_token_expiry_time=NOW + timedelta(hours=1)))
    authorization_id = due.authorization.authorizationId or ""
    [work] = await store.claim_due_work(SCHEDULE, limit=10)
    await store.finish_due_work([DueWorkDone(work, refresh_published=True, warning_published=False)])

    # The worker's attempt failed (Alipay answered U): its claim goes back for the retry, the request stays
    # pending, and the scheduler sends no second request on its next passes.
    claim = await store.claim_refresh(authorization_id, due.authorization.accessTokenFingerprint,
                                      until=datetime.now(UTC) + timedelta(seconds=30))
    assert claim.outcome is ClaimOutcome.CLAIMED
    await store.release_refresh(authorization_id, request_done=False)
    assert await store.claim_due_work(SCHEDULE, limit=10) == []
    retry = await store.claim_refresh(authorization_id, due.authorization.accessTokenFingerprint,
                                      until=datetime.now(UTC) + timedelta(seconds=30))
    assert retry.outcome is ClaimOutcome.CLAIMED  # the retry takes the claim back

    # Answered for good (nothing to do for it): a later due time may be requested again.
    await store.release_refresh(authorization_id, request_done=True)
    [again] = await store.claim_due_work(SCHEDULE, limit=10)
    assert again.authorization.authorizationId == authorization_id and again.refresh


async def test_a_lease_abandoned_by_a_dead_scheduler_is_taken_over(store: AuthorizationStore) -> None:
    await store.record_tokens(grant(token(), access_token_expiry_time=NOW + timedelta(hours=1)))
    short = Schedule(SCHEDULE.refresh_before, SCHEDULE.expiry_warning, SCHEDULE.pending, lease=timedelta(0))
    [first] = await store.claim_due_work(short, limit=10)
    await asyncio.sleep(0.01)
    [second] = await store.claim_due_work(short, limit=10)  # the first never finished: its lease ran out
    assert second.authorization.authorizationId == first.authorization.authorizationId
    await store.finish_due_work([DueWorkDone(first, True, False)])  # too late: the claim is the second's now
    assert (await store.claim_due_work(short, limit=10))[0].authorization.authorizationId == \
        first.authorization.authorizationId
    stats = await store.lifecycle_stats(short)
    assert stats.oldest_due is not None and stats.oldest_due <= datetime.now(UTC)


# --- pages, filters, commands ----------------------------------------------------------------------------


async def test_pages_follow_a_cursor_and_filters_combine(store: AuthorizationStore) -> None:
    made = [await store.record_tokens(grant(token(), reference_merchant_id="M-PAGE")) for _ in range(5)]
    expiring = await store.record_tokens(grant(token(), reference_merchant_id="M-OTHER",
                                               refresh_token_expiry_time=NOW + timedelta(hours=5)))
    ids: list[str | None] = []
    after = None
    while True:
        page = await store.page_authorizations(merchant="M-PAGE", limit=2, after=after)
        ids += [item.authorizationId for item in page.items]
        if page.next_after is None:
            break
        after = page.next_after
    assert ids == [m.authorization.authorizationId for m in made]
    soon = await store.page_authorizations(expiring_before=NOW + timedelta(days=1))
    assert [i.authorizationId for i in soon.items] == [expiring.authorization.authorizationId]
    assert (await store.page_authorizations(provider="ams")).items == []


async def test_command_outcomes_are_recorded_and_replaced(store: AuthorizationStore) -> None:
    outcome = CommandOutcome("cmd_x", "revoke", "auth_y", "retrying", "revoke answered U", 1, datetime.now(UTC))
    await store.record_command(outcome)
    await store.record_command(CommandOutcome("cmd_x", "revoke", "auth_y", "succeeded", "canceled", 2,
                                              datetime.now(UTC)))
    found = await store.command("cmd_x")
    assert found is not None and found.status == "succeeded" and found.attempts == 2
    assert await store.command("cmd_none") is None


# --- migration 0002 over 0001's rows -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_migration_0002_gives_existing_rows_ids_and_history_and_matches_the_schema(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path, token_keys: TokenKeys) -> None:
    if kind == "postgresql":
        request.getfixturevalue("postgres_url")
    async with fresh_database(kind, request, tmp_path) as url:
        engine = create_engine(url, pooled=False)
        try:
            async with engine.connect() as conn:
                def upgrade(sync: object, revision: str) -> None:
                    config = alembic_config()
                    config.attributes["connection"] = sync
                    command.upgrade(config, revision)

                await conn.run_sync(upgrade, "0001_initial")
                for fingerprint, status in (("aaaa000000000001", "active"), ("aaaa000000000002", "canceled")):
                    await conn.execute(text(
                        "INSERT INTO authorizations (access_token_fingerprint, provider, status, created_at, "
                        "updated_at, activated_at) VALUES (:f, 'aps', :s, :t, :t, :t)"),
                        {"f": fingerprint, "s": status, "t": datetime(2026, 1, 1, tzinfo=UTC)})
                await conn.execute(text("INSERT INTO code_exchanges VALUES ('h1', 'aps', 'aaaa000000000001', :t)"),
                                   {"t": datetime(2026, 1, 1, tzinfo=UTC)})
                await conn.commit()
                await conn.run_sync(upgrade, "head")
                await conn.commit()
                differences = await conn.run_sync(
                    lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))
        finally:
            await engine.dispose()
        assert differences == []

        migrated = await SqlStore.connect(url, token_keys)
        try:
            rows = await migrated.list_authorizations()
            assert len({row.authorizationId for row in rows}) == 2
            assert all(row.authorizationId and row.authorizationId.startswith("auth_")
                       and len(row.authorizationId) <= 40 for row in rows)
            found = await migrated.get_authorization("aaaa000000000001")
            assert found is not None and await migrated.get_authorization(found.authorizationId or "") == found
            timeline = await migrated.timeline(found.authorizationId or "")
            assert timeline is not None
            [activated] = history(timeline)
            # The activation keeps the id it had before the migration.
            assert activated.id == webhook_id("aps", "aaaa000000000001", "authorization.activated")
            async with migrated.engine.connect() as conn:
                exchange = (await conn.execute(text("SELECT access_token_fingerprint FROM code_exchanges"))).scalar()
            assert exchange == "aaaa000000000001"
            # The new statuses are accepted.
            assert (await migrated.record_expiry(found.authorizationId or "", "test")).authorization.status == "expired"
        finally:
            await migrated.close()
