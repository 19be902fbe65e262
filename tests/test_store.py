"""The store, on SQLite and PostgreSQL: event rules, tombstones, code exchanges, encryption, migrations."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from authnotify.config import TokenKeys
from authnotify.domain.authorizations import AuthorizationData, Cancellation, TokenGrant, access_token_fingerprint
from authnotify.domain.events import MerchantEvent, activation_events, cancellation_events
from authnotify.errors import ConfigError
from authnotify.store import SqlStore as Store
from authnotify.store import StoreError
from authnotify.store.memory import InMemoryStore
from authnotify.store.migrations import head_revision, upgrade_database
from authnotify.store.repository import AuthorizationStore
from authnotify.store.schema import code_exchanges
from tests.conftest import fresh_database

ACTIVATED = "authorization.activated"
CANCELED = "authorization.canceled"


def _token(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def _grant(access_token: str, **fields: object) -> TokenGrant:
    values: dict[str, object] = {
        "provider": "aps",
        "access_token": access_token,
        "refresh_token": _token("rt"),
        "access_token_expiry_time": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        "refresh_token_expiry_time": datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC),
        "auth_client_id": "218823863726000001",
        "reference_merchant_id": "M0001",
        "reference_agreement_id": f"agr-{uuid.uuid4().hex[:8]}",
        "customer_id": "cust-1",
        "user_login_id": "user@example.com",
        "auth_state": "663A8FA9-D836-48EE-8AA1-1FF682989DC7",
        "scopes": ["AGREEMENT_PAY"],
    }
    values.update(fields)
    return TokenGrant(**values)  # type: ignore[arg-type]


def _cancel(access_token: str, **fields: object) -> Cancellation:
    values: dict[str, object] = {"provider": "aps", "access_token": access_token, "token_cancel_source": "PSP",
                                 "reason": "user unbound", "auth_client_id": "218823863726000001",
                                 "reference_merchant_id": "M0001"}
    values.update(fields)
    return Cancellation(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Recorded:
    authorization: AuthorizationData
    events: list[MerchantEvent]


class Recording:
    """A store with the domain's event rules applied to each write, as the handlers apply them: what these
    tests check is the pair (the store's transitions, the rules over them)."""

    def __init__(self, store: AuthorizationStore) -> None:
        self.store = store

    async def record_tokens(self, grant: TokenGrant, *, possibly_seen_before: bool) -> Recorded:
        transition = await self.store.record_tokens(grant)
        return Recorded(transition.authorization, activation_events(transition, possibly_seen_before=possibly_seen_before))

    async def record_code_exchange(self, provider: str, code: str, grant: TokenGrant, *,
                                   possibly_seen_before: bool) -> Recorded:
        transition = await self.store.record_code_exchange(provider, code, grant)
        return Recorded(transition.authorization, activation_events(transition, possibly_seen_before=possibly_seen_before))

    async def record_cancellation(self, cancel: Cancellation, *, possibly_seen_before: bool) -> Recorded:
        transition = await self.store.record_cancellation(cancel)
        return Recorded(transition.authorization,
                        cancellation_events(transition, possibly_seen_before=possibly_seen_before))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture
async def sql_store(database_url: str, token_keys: TokenKeys) -> AsyncIterator[Recording]:
    """For what only a database shows: what its tables hold."""
    opened = await Store.connect(database_url, token_keys)
    yield Recording(opened)
    await opened.close()


@pytest.fixture(params=["sqlite", "postgresql", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, token_keys: TokenKeys) -> AsyncIterator[Recording]:
    """The same behaviour on every store: SQLite, PostgreSQL, and the in-memory fake the fast tests use."""
    if request.param == "memory":
        yield Recording(InMemoryStore())
        return
    async with fresh_database(request.param, request, tmp_path) as url:
        opened = await Store.connect(url, token_keys)
        yield Recording(opened)
        await opened.close()


# --- record_tokens ---------------------------------------------------------------------------------


async def test_new_grant_is_active_and_emits_activated(store: Store) -> None:
    access = _token("at")
    grant = _grant(access)

    recorded = await store.record_tokens(grant, possibly_seen_before=False)

    data = recorded.authorization
    assert data.status == "active"
    assert data.provider == "aps"
    assert data.accessTokenFingerprint == access_token_fingerprint(access)
    assert data.referenceAgreementId == grant.reference_agreement_id
    assert data.scopes == ["AGREEMENT_PAY"]
    assert data.accessTokenExpiryTime == "2030-01-02T03:04:05Z"
    assert data.refreshTokenExpiryTime == "2031-01-02T03:04:05Z"
    assert data.canceledAt is None
    assert [event.type for event in recorded.events] == [ACTIVATED]
    assert recorded.events[0].data == data


async def test_known_active_grant_emits_nothing_unless_possibly_seen_before(store: Store) -> None:
    grant = _grant(_token("at"))
    first = await store.record_tokens(grant, possibly_seen_before=False)

    again = await store.record_tokens(grant, possibly_seen_before=False)
    redelivered = await store.record_tokens(grant, possibly_seen_before=True)

    assert again.events == []
    assert again.authorization.status == "active"
    # A redelivery may follow a crash before the first event went out: re-emit it, byte for byte.
    assert redelivered.events == first.events
    assert redelivered.events[0].to_json() == first.events[0].to_json()


async def test_known_grant_updates_fields_and_keeps_what_it_does_not_know(store: Store) -> None:
    access = _token("at")
    first = await store.record_tokens(_grant(access), possibly_seen_before=False)
    new_expiry = datetime(2032, 6, 1, 12, 0, tzinfo=UTC)
    new_refresh = _token("rt")

    updated = await store.record_tokens(
        TokenGrant(provider="aps", access_token=access, refresh_token=new_refresh,
                   access_token_expiry_time=new_expiry, customer_id="cust-2"),
        possibly_seen_before=False,
    )

    assert updated.authorization.accessTokenExpiryTime == "2032-06-01T12:00:00Z"
    assert updated.authorization.customerId == "cust-2"
    assert updated.authorization.referenceAgreementId == first.authorization.referenceAgreementId
    assert updated.authorization.scopes == ["AGREEMENT_PAY"]
    assert await store.tokens_of("aps", first.authorization.accessTokenFingerprint) == (access, new_refresh)


async def test_same_token_at_two_providers_is_two_authorizations(store: Store) -> None:
    access = _token("at")
    aps = await store.record_tokens(_grant(access, provider="aps"), possibly_seen_before=False)
    ams = await store.record_tokens(_grant(access, provider="ams"), possibly_seen_before=False)

    assert aps.events and ams.events
    assert aps.events[0].id != ams.events[0].id
    assert len(await store.list_authorizations()) == 2


# --- record_cancellation ---------------------------------------------------------------------------


async def test_cancel_active_authorization_emits_canceled(store: Store) -> None:
    access = _token("at")
    created = await store.record_tokens(_grant(access), possibly_seen_before=False)

    recorded = await store.record_cancellation(_cancel(access), possibly_seen_before=False)

    data = recorded.authorization
    assert data.status == "canceled"
    assert data.tokenCancelSource == "PSP"
    assert data.reason == "user unbound"
    assert data.canceledAt is not None
    assert data.referenceAgreementId == created.authorization.referenceAgreementId
    assert [event.type for event in recorded.events] == [CANCELED]
    assert recorded.events[0].createdAt == data.canceledAt


async def test_cancel_of_canceled_emits_only_when_possibly_seen_before(store: Store) -> None:
    access = _token("at")
    await store.record_tokens(_grant(access), possibly_seen_before=False)
    first = await store.record_cancellation(_cancel(access), possibly_seen_before=False)

    again = await store.record_cancellation(_cancel(access, reason="another reason"), possibly_seen_before=False)
    redelivered = await store.record_cancellation(_cancel(access), possibly_seen_before=True)

    assert again.events == []
    assert again.authorization.reason == "user unbound"  # the first cancellation's facts stand
    assert redelivered.events[0].to_json() == first.events[0].to_json()


async def test_cancel_before_create_leaves_authorization_canceled(store: Store) -> None:
    access = _token("at")
    tombstone = await store.record_cancellation(_cancel(access), possibly_seen_before=False)
    assert tombstone.authorization.status == "canceled"
    assert [event.type for event in tombstone.events] == [CANCELED]

    grant = _grant(access)
    late = await store.record_tokens(grant, possibly_seen_before=False)
    late_redelivered = await store.record_tokens(grant, possibly_seen_before=True)

    for recorded in (late, late_redelivered):
        assert recorded.events == []  # never an activation for a canceled authorization
        assert recorded.authorization.status == "canceled"
    # The late TOKEN_CREATED filled in what it knows.
    assert late.authorization.referenceAgreementId == grant.reference_agreement_id
    assert late.authorization.accessTokenExpiryTime == "2030-01-02T03:04:05Z"
    assert late.authorization.canceledAt == tombstone.authorization.canceledAt
    stored = await store.get_authorization(tombstone.authorization.accessTokenFingerprint)
    assert stored is not None and stored.status == "canceled"
    again = await store.record_cancellation(_cancel(access), possibly_seen_before=True)
    assert again.events[0].id == tombstone.events[0].id
    assert again.events[0].createdAt == tombstone.events[0].createdAt


async def test_concurrent_duplicates_activate_once(store: Store) -> None:
    grant = _grant(_token("at"))

    results = await asyncio.gather(*(store.record_tokens(grant, possibly_seen_before=False) for _ in range(12)))

    assert sum(len(r.events) for r in results) == 1
    assert all(r.authorization.status == "active" for r in results)
    assert len(await store.list_authorizations()) == 1


async def test_concurrent_cancel_and_create_end_canceled(store: Store) -> None:
    access = _token("at")
    jobs = [store.record_tokens(_grant(access), possibly_seen_before=False) for _ in range(4)]
    jobs += [store.record_cancellation(_cancel(access), possibly_seen_before=False) for _ in range(4)]

    results = await asyncio.gather(*jobs)

    canceled_events = [e for r in results for e in r.events if e.type == CANCELED]
    assert len(canceled_events) == 1
    stored = await store.list_authorizations()
    assert [a.status for a in stored] == ["canceled"]


# --- code exchange ---------------------------------------------------------------------------------


async def test_code_exchange_recorded_once_and_by_hash(sql_store: Recording) -> None:
    store = sql_store
    code = f"281010133AB2F588{uuid.uuid4().hex}"
    access = _token("at")
    assert await store.find_code_exchange("ams", code) is None

    grant = _grant(access, provider="ams")
    first = await store.record_code_exchange("ams", code, grant, possibly_seen_before=False)
    second = await store.record_code_exchange("ams", code, grant, possibly_seen_before=False)
    redelivered = await store.record_code_exchange("ams", code, grant, possibly_seen_before=True)

    assert [e.type for e in first.events] == [ACTIVATED]
    assert second.events == []
    assert redelivered.events == first.events
    found = await store.find_code_exchange("ams", code)
    assert found is not None and found.accessTokenFingerprint == access_token_fingerprint(access)
    assert await store.find_code_exchange("aps", code) is None  # the provider is part of the key
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(code_exchanges))).all()
    assert len(rows) == 1
    assert rows[0].code_hash == hashlib.sha256(f"ams\n{code}".encode()).hexdigest()
    assert code not in repr(tuple(rows[0]))


async def test_code_exchange_of_canceled_authorization_emits_nothing(store: Store) -> None:
    access = _token("at")
    await store.record_cancellation(_cancel(access, provider="ams"), possibly_seen_before=False)

    recorded = await store.record_code_exchange("ams", _token("code"), _grant(access, provider="ams"),
                                                possibly_seen_before=True)

    assert recorded.events == []
    assert recorded.authorization.status == "canceled"


# --- reads -----------------------------------------------------------------------------------------


async def test_get_by_fingerprint_or_agreement_and_list_filters(store: Store) -> None:
    a = await store.record_tokens(_grant(_token("at"), reference_merchant_id="M-A", auth_client_id="C-A"),
                                  possibly_seen_before=False)
    b = await store.record_tokens(_grant(_token("at"), reference_merchant_id="M-B", auth_client_id="C-B"),
                                  possibly_seen_before=False)
    c_access = _token("at")
    await store.record_tokens(_grant(c_access, reference_merchant_id="M-B", auth_client_id="C-A"),
                              possibly_seen_before=False)
    await store.record_cancellation(_cancel(c_access, reference_merchant_id="M-B", auth_client_id="C-A"),
                                    possibly_seen_before=False)

    assert await store.get_authorization(a.authorization.accessTokenFingerprint) == a.authorization
    assert await store.get_authorization(b.authorization.referenceAgreementId or "") == b.authorization
    assert await store.get_authorization("no-such-key") is None
    assert len(await store.list_authorizations()) == 3
    assert {x.status for x in await store.list_authorizations(status="canceled")} == {"canceled"}
    assert len(await store.list_authorizations(status="active")) == 2
    # --merchant matches referenceMerchantId or authClientId.
    assert len(await store.list_authorizations(merchant="M-B")) == 2
    assert len(await store.list_authorizations(merchant="C-A")) == 2
    assert len(await store.list_authorizations(merchant="C-A", status="active")) == 1


async def test_expiring_queries_compare_instants(store: Store) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    plus8 = timezone(timedelta(hours=8))
    soon = await store.record_tokens(_grant(_token("at"), access_token_expiry_time=(now + timedelta(hours=1))
                                            .astimezone(plus8), refresh_token_expiry_time=now + timedelta(days=40)),
                                     possibly_seen_before=False)
    later = await store.record_tokens(_grant(_token("at"), access_token_expiry_time=now + timedelta(days=3),
                                             refresh_token_expiry_time=now + timedelta(days=5)),
                                      possibly_seen_before=False)
    canceled_access = _token("at")
    await store.record_tokens(_grant(canceled_access, access_token_expiry_time=now + timedelta(minutes=5)),
                              possibly_seen_before=False)
    await store.record_cancellation(_cancel(canceled_access), possibly_seen_before=False)
    await store.record_tokens(_grant(_token("at"), access_token_expiry_time=None, refresh_token_expiry_time=None),
                              possibly_seen_before=False)

    within_a_day = await store.expiring(before=now + timedelta(days=1), token="access")
    within_a_week = await store.expiring(before=(now + timedelta(days=7)).astimezone(plus8), token="access")
    refresh_within_a_week = await store.expiring(before=now + timedelta(days=7), token="refresh")

    assert [a.accessTokenFingerprint for a in within_a_day] == [soon.authorization.accessTokenFingerprint]
    assert within_a_day[0].accessTokenExpiryTime == (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert [a.accessTokenFingerprint for a in within_a_week] == [
        soon.authorization.accessTokenFingerprint, later.authorization.accessTokenFingerprint]
    assert [a.accessTokenFingerprint for a in refresh_within_a_week] == [later.authorization.accessTokenFingerprint]
    assert await store.expiring(before=now, token="access") == []


# --- encryption and keys ---------------------------------------------------------------------------


async def test_tokens_decrypt_after_key_rotation_and_reencryption(database_url: str) -> None:
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    access, refresh = _token("at"), _token("rt")
    fingerprint = access_token_fingerprint(access)
    old = await Store.connect(database_url, TokenKeys([old_key]))
    try:
        await old.record_tokens(_grant(access, refresh_token=refresh))
        await old.record_cancellation(_cancel(_token("at")))  # no refresh token
    finally:
        await old.close()

    rotated = await Store.connect(database_url, TokenKeys([new_key, old_key]))
    try:
        assert await rotated.tokens_of("aps", fingerprint) == (access, refresh)
        assert await rotated.reencrypt_tokens(batch_size=1) == 2
    finally:
        await rotated.close()

    new_only = await Store.connect(database_url, TokenKeys([new_key]))
    old_only = await Store.connect(database_url, TokenKeys([old_key]))
    try:
        assert await new_only.tokens_of("aps", fingerprint) == (access, refresh)
        assert await new_only.tokens_of("aps", "0000000000000000") is None
        with pytest.raises(StoreError) as raised:
            await old_only.tokens_of("aps", fingerprint)
        assert access not in str(raised.value)
    finally:
        await new_only.close()
        await old_only.close()


async def test_reading_needs_no_token_keys_but_writing_does(database_url: str, token_keys: TokenKeys) -> None:
    writer = await Store.connect(database_url, token_keys)
    await writer.record_tokens(_grant(_token("at")))
    await writer.close()

    reader = await Store.connect(database_url, None)
    try:
        assert len(await reader.list_authorizations()) == 1
        with pytest.raises(ConfigError, match="AUTHNOTIFY_TOKEN_KEYS"):
            await reader.record_tokens(_grant(_token("at")))
    finally:
        await reader.close()


async def test_sqlite_file_holds_no_raw_token_or_code(tmp_path: Path, token_keys: TokenKeys) -> None:
    database = tmp_path / "scan.db"
    store = await Store.connect(f"sqlite+aiosqlite:///{database}", token_keys)
    secrets: list[str] = []
    try:
        for _ in range(3):
            access, refresh, code = _token("AT"), _token("RT"), _token("CODE")
            secrets += [access, refresh, code]
            await store.record_code_exchange("ams", code, _grant(access, provider="ams", refresh_token=refresh))
        canceled = _token("AT")
        secrets.append(canceled)
        await store.record_cancellation(_cancel(canceled))
        assert len(await store.list_authorizations()) == 4
    finally:
        await store.close()

    files = [p for p in tmp_path.iterdir() if p.name.startswith("scan.db")]
    contents = b"".join(p.read_bytes() for p in files)
    assert len(contents) > 0
    for secret in secrets:
        assert secret.encode() not in contents
        assert secret[-16:].encode() not in contents


def test_grant_and_cancellation_repr_hide_tokens() -> None:
    access = _token("at")
    assert access not in repr(_grant(access))
    assert access not in repr(_cancel(access))


# --- migrations and connectivity -------------------------------------------------------------------


async def test_migrations_are_idempotent(database_url: str) -> None:
    head = head_revision()
    assert await upgrade_database(database_url) == head
    assert await upgrade_database(database_url) == head
    store = await Store.connect(database_url, None, migrate=True)
    await store.close()


_MIGRATE_SCRIPT = (
    "import asyncio, sys\n"
    "from authnotify.store.migrations import upgrade_database\n"
    "print(asyncio.run(upgrade_database(sys.argv[1])))\n"
)


@pytest.mark.slow
async def test_migrations_are_safe_when_run_concurrently(database_url: str, token_keys: TokenKeys) -> None:
    processes = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", _MIGRATE_SCRIPT, database_url,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        for _ in range(2)
    ]
    # Separate processes and, at the same time, separate connections in this one all race for the lock.
    in_process, outputs = await asyncio.wait_for(
        asyncio.gather(
            asyncio.gather(*(upgrade_database(database_url) for _ in range(3))),
            asyncio.gather(*(p.communicate() for p in processes)),
        ),
        timeout=120,
    )

    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err.decode()
        assert out.decode().strip() == head_revision()
    assert in_process == [head_revision()] * 3
    store = await Store.connect(database_url, token_keys)
    try:
        transition = await store.record_tokens(_grant(_token("at")))
        assert transition.changed
    finally:
        await store.close()


async def test_unreachable_database_is_a_store_error_without_password() -> None:
    url = "postgresql+asyncpg://someone:hunter2secret@127.0.0.1:1/nowhere"
    with pytest.raises(StoreError) as raised:
        await Store.connect(url, None)
    assert "hunter2secret" not in str(raised.value)
    assert "127.0.0.1:1" in str(raised.value)
    with pytest.raises(StoreError):
        await Store.connect(url, None, migrate=False)


async def test_missing_sqlite_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await Store.connect(f"sqlite+aiosqlite:///{tmp_path}/missing/dir/x.db", None)


# --- group commit (the performance engineer's batching of concurrent record_tokens) ------------------


async def test_concurrent_grants_share_transactions_with_the_same_event_rules(store: Store) -> None:
    known = _token("at")
    await store.record_tokens(_grant(known), possibly_seen_before=False)
    fresh = [_token("at") for _ in range(40)]
    jobs = [store.record_tokens(_grant(token), possibly_seen_before=False) for token in fresh]
    jobs += [store.record_tokens(_grant(fresh[0], customer_id="cust-2"), possibly_seen_before=False)]  # repeat
    jobs += [store.record_tokens(_grant(known, user_login_id="new@example.com"), possibly_seen_before=False)]
    jobs += [store.record_tokens(_grant(known), possibly_seen_before=True)]

    results = await asyncio.gather(*jobs)

    assert [len(r.events) for r in results[:40]] == [1] * 40  # each new authorization activated once
    assert results[40].events == [] and results[40].authorization.customerId == "cust-2"
    assert results[41].events == [] and results[41].authorization.userLoginId == "new@example.com"
    assert [e.type for e in results[42].events] == [ACTIVATED]  # possibly seen before: re-emitted
    assert len(await store.list_authorizations()) == 41


async def test_a_grant_the_database_refuses_fails_alone_not_its_batch(sql_store: Recording) -> None:
    store = sql_store
    tokens = [_token("at") for _ in range(20)]
    jobs = [store.record_tokens(_grant(token), possibly_seen_before=False) for token in tokens]
    # PostgreSQL refuses a NUL character in text; SQLite stores it.
    jobs.insert(7, store.record_tokens(_grant(_token("at"), customer_id="bad\x00value"), possibly_seen_before=False))

    results = await asyncio.gather(*jobs, return_exceptions=True)

    good = results[:7] + results[8:]
    assert all(not isinstance(r, BaseException) and [e.type for e in r.events] == [ACTIVATED] for r in good)
    if store.engine.dialect.name == "postgresql":
        assert isinstance(results[7], StoreError)
        assert len(await store.list_authorizations()) == 20
    else:
        assert not isinstance(results[7], BaseException)
