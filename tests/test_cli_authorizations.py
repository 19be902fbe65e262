"""``authnotify authorizations list|show``, run as the operator runs it: a subprocess against a filled database."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from authnotify.config import TokenKeys
from authnotify.domain.authorizations import Cancellation, TokenGrant, access_token_fingerprint
from authnotify.store import SqlStore as Store

pytestmark = pytest.mark.slow  # every test here runs the authnotify command as a process

DATA_KEYS = [
    "authorizationId", "provider", "status", "accessTokenFingerprint", "authClientId", "referenceMerchantId",
    "referenceAgreementId", "customerId", "userLoginId", "authState", "scopes", "accessTokenExpiryTime",
    "refreshTokenExpiryTime", "canceledAt", "tokenCancelSource", "reason",
]


@dataclass(frozen=True)
class Filled:
    database_url: str
    secrets: list[str]
    active_aps: str  # fingerprints
    active_ams: str
    canceled_aps: str
    agreement: str


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
async def filled(database_url: str, token_keys: TokenKeys) -> Filled:
    tokens = [f"AT-{uuid.uuid4().hex}" for _ in range(3)]
    refresh = f"RT-{uuid.uuid4().hex}"
    code = f"CODE-{uuid.uuid4().hex}"
    agreement = f"agr-{uuid.uuid4().hex[:10]}"
    store = await Store.connect(database_url, token_keys)
    try:
        await store.record_tokens(
            TokenGrant(provider="aps", access_token=tokens[0], refresh_token=refresh,
                       access_token_expiry_time=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
                       refresh_token_expiry_time=datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC),
                       auth_client_id="CLIENT-1", reference_merchant_id="MERCHANT-1",
                       reference_agreement_id=agreement, customer_id="cust-1", user_login_id="u***@example.com",
                       auth_state="state-1", scopes=["AGREEMENT_PAY"]),
        )
        await store.record_code_exchange(
            "ams", code, TokenGrant(provider="ams", access_token=tokens[1], auth_client_id="MERCHANT-1",
                                    reference_merchant_id="MERCHANT-2"),
        )
        await store.record_cancellation(
            Cancellation(provider="aps", access_token=tokens[2], auth_client_id="CLIENT-3",
                         reference_merchant_id="MERCHANT-3", token_cancel_source="PSP", reason="user unbound"),
        )
    finally:
        await store.close()
    fingerprints = [access_token_fingerprint(t) for t in tokens]
    return Filled(database_url, [*tokens, refresh, code], *fingerprints, agreement)


async def _cli(database_url: str, cwd: Path, *args: str) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHNOTIFY_")}
    env["AUTHNOTIFY_DATABASE_URL"] = database_url  # no AUTHNOTIFY_TOKEN_KEYS: reading needs none
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "authorizations", *args,
        cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def _many(filled: Filled, cwd: Path, *invocations: tuple[str, ...]) -> list[Result]:
    # Concurrently: each run pays the interpreter's start-up, not the test's wall time.
    return list(await asyncio.gather(*(_cli(filled.database_url, cwd, *args) for args in invocations)))


def _assert_no_secret(filled: Filled, *results: Result) -> None:
    for result in results:
        for secret in filled.secrets:
            assert secret not in result.stdout and secret not in result.stderr


async def test_list_json_prints_data_objects_and_filters(filled: Filled, tmp_path: Path) -> None:
    everything, canceled, by_merchant = await _many(
        filled, tmp_path,
        ("list", "--json"),
        ("list", "--json", "--status", "canceled"),
        ("list", "--json", "--merchant", "MERCHANT-1", "--status", "active"),
    )
    for result in (everything, canceled, by_merchant):
        assert result.code == 0, result.stderr
        assert result.stderr == ""
    _assert_no_secret(filled, everything, canceled, by_merchant)

    items = json.loads(everything.stdout)
    assert isinstance(items, list) and len(items) == 3
    for item in items:
        assert list(item) == DATA_KEYS
    by_fingerprint = {item["accessTokenFingerprint"]: item for item in items}
    assert by_fingerprint[filled.active_aps] == {
        "authorizationId": by_fingerprint[filled.active_aps]["authorizationId"],
        "provider": "aps", "status": "active", "accessTokenFingerprint": filled.active_aps,
        "authClientId": "CLIENT-1", "referenceMerchantId": "MERCHANT-1", "referenceAgreementId": filled.agreement,
        "customerId": "cust-1", "userLoginId": "u***@example.com", "authState": "state-1",
        "scopes": ["AGREEMENT_PAY"], "accessTokenExpiryTime": "2030-01-02T03:04:05Z",
        "refreshTokenExpiryTime": "2031-01-02T03:04:05Z", "canceledAt": None, "tokenCancelSource": None,
        "reason": None,
    }
    assert by_fingerprint[filled.active_ams]["provider"] == "ams"
    tombstone = by_fingerprint[filled.canceled_aps]
    assert tombstone["status"] == "canceled"
    assert tombstone["tokenCancelSource"] == "PSP" and tombstone["reason"] == "user unbound"
    assert tombstone["canceledAt"].endswith("Z")

    assert [i["accessTokenFingerprint"] for i in json.loads(canceled.stdout)] == [filled.canceled_aps]
    # --merchant matches referenceMerchantId (the aps one) or authClientId (the ams one).
    assert {i["accessTokenFingerprint"] for i in json.loads(by_merchant.stdout)} == {
        filled.active_aps, filled.active_ams}


async def test_show_by_fingerprint_or_agreement_and_missing_key(filled: Filled, tmp_path: Path) -> None:
    by_fingerprint, by_agreement, missing = await _many(
        filled, tmp_path,
        ("show", filled.canceled_aps, "--json"),
        ("show", filled.agreement, "--json"),
        ("show", "does-not-exist", "--json"),
    )
    _assert_no_secret(filled, by_fingerprint, by_agreement, missing)

    assert by_fingerprint.code == 0, by_fingerprint.stderr
    shown = json.loads(by_fingerprint.stdout)
    assert isinstance(shown, dict) and list(shown) == DATA_KEYS
    assert shown["accessTokenFingerprint"] == filled.canceled_aps and shown["status"] == "canceled"

    assert by_agreement.code == 0, by_agreement.stderr
    assert json.loads(by_agreement.stdout)["accessTokenFingerprint"] == filled.active_aps

    assert missing.code == 1
    assert missing.stdout == ""
    assert len(missing.stderr.strip().splitlines()) == 1
    # Named by its hash: a key that is not an id or a fingerprint may be a raw token pasted by mistake.
    assert "does-not-exist" not in missing.stderr and "sha256:" in missing.stderr


async def test_human_output_is_readable_tables(filled: Filled, tmp_path: Path) -> None:
    listed, shown = await _many(filled, tmp_path, ("list",), ("show", filled.agreement))

    for result in (listed, shown):
        assert result.code == 0, result.stderr
    _assert_no_secret(filled, listed, shown)
    for fingerprint in (filled.active_aps, filled.active_ams, filled.canceled_aps):
        assert fingerprint in listed.stdout
    assert "Fingerprint" in listed.stdout and "canceled" in listed.stdout
    assert filled.active_aps in shown.stdout and "2030-01-02T03:04:05Z" in shown.stdout


async def test_unreachable_database_is_one_line_and_nonzero(tmp_path: Path) -> None:
    result = await _cli("postgresql+asyncpg://someone:hunter2secret@127.0.0.1:1/nowhere", tmp_path, "list")

    assert result.code != 0
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and "hunter2secret" not in result.stderr


async def test_expired_and_expiring_authorizations_and_any_key_of_one(database_url: str, token_keys: TokenKeys,
                                                                       tmp_path: Path) -> None:
    from datetime import timedelta

    now = datetime.now(UTC)
    store = await Store.connect(database_url, token_keys)
    try:
        soon = await store.record_tokens(TokenGrant(provider="aps", access_token=f"AT-{uuid.uuid4().hex}",
                                                    refresh_token=f"RT-{uuid.uuid4().hex}",
                                                    refresh_token_expiry_time=now + timedelta(hours=20)))
        await store.record_tokens(TokenGrant(provider="aps", access_token=f"AT-{uuid.uuid4().hex}",
                                             refresh_token_expiry_time=now + timedelta(days=100)))
        ended = await store.record_tokens(TokenGrant(provider="ams", access_token=f"AT-{uuid.uuid4().hex}"))
        await store.record_expiry(ended.authorization.authorizationId or "", "the refresh token expired")
    finally:
        await store.close()
    filled = Filled(database_url, [], "", "", "", "")
    expired, expiring, by_id, bad_duration = await _many(
        filled, tmp_path, ("list", "--json", "--status", "expired"), ("list", "--json", "--expiring-within", "1d"),
        ("show", ended.authorization.authorizationId or "", "--json"), ("list", "--expiring-within", "soon"))

    assert [i["authorizationId"] for i in json.loads(expired.stdout)] == [ended.authorization.authorizationId]
    assert json.loads(expired.stdout)[0]["reason"] == "the refresh token expired"
    assert [i["authorizationId"] for i in json.loads(expiring.stdout)] == [soon.authorization.authorizationId]
    assert json.loads(by_id.stdout)["status"] == "expired"
    assert bad_duration.code == 2 and len(bad_duration.stderr.strip().splitlines()) == 1


async def test_api_keys_create_prints_the_key_once_and_an_entry_that_loads(tmp_path: Path) -> None:
    from authnotify.api.keys import parse_api_keys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "api-keys", "create", "billing", "--scope", "tokens:read",
        "--scope", "authorizations:read", cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    key, *entry = out.decode().splitlines()
    keys = parse_api_keys("\n".join(entry))
    found = keys.find(key)
    assert found is not None and found.name == "billing"
    assert found.scopes == {"tokens:read", "authorizations:read"}
    assert key not in "\n".join(entry)  # only its hash goes into the file

    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", "api-keys", "create", "billing", "--scope", "everything",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(bad.communicate(), timeout=60)
    assert bad.returncode == 2 and out == b"" and len(err.decode().strip().splitlines()) == 1
