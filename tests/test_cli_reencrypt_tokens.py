"""``authnotify reencrypt-tokens``: after a token-key rotation, old keys can be dropped without losing a token."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from authnotify.config import TokenKeys
from authnotify.domain.authorizations import TokenGrant, access_token_fingerprint
from authnotify.store import SqlStore as Store
from authnotify.store import StoreError

pytestmark = pytest.mark.slow  # every test here runs the authnotify command as a process


async def authnotify(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authnotify", *args,
        cwd=cwd, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_reencrypted_tokens_decrypt_with_the_new_key_alone(database_url: str, tmp_path: Path) -> None:
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    access_token, refresh_token = f"AT-{uuid.uuid4().hex}", f"RT-{uuid.uuid4().hex}"
    store = await Store.connect(database_url, TokenKeys([old_key]))
    try:
        await store.record_tokens(
            TokenGrant(provider="aps", access_token=access_token, refresh_token=refresh_token),
        )
    finally:
        await store.close()

    env = {"AUTHNOTIFY_DATABASE_URL": database_url, "AUTHNOTIFY_TOKEN_KEYS": f"{new_key},{old_key}"}
    code, stdout, stderr = await authnotify("reencrypt-tokens", env=env, cwd=tmp_path)
    assert (code, stderr) == (0, "")
    assert "re-encrypted the tokens of 1 authorizations" in stdout
    assert access_token not in stdout and refresh_token not in stdout

    fingerprint = access_token_fingerprint(access_token)
    only_new = await Store.connect(database_url, TokenKeys([new_key]))
    try:
        assert await only_new.tokens_of("aps", fingerprint) == (access_token, refresh_token)
    finally:
        await only_new.close()
    only_old = await Store.connect(database_url, TokenKeys([old_key]))
    try:
        try:
            await only_old.tokens_of("aps", fingerprint)
        except StoreError:
            pass
        else:
            raise AssertionError("the old key alone still decrypts: nothing was re-encrypted")
    finally:
        await only_old.close()


async def test_reencrypt_tokens_without_token_keys_is_one_line(tmp_path: Path) -> None:
    env = {"AUTHNOTIFY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/x.db", "AUTHNOTIFY_TOKEN_KEYS": ""}
    code, stdout, stderr = await authnotify("reencrypt-tokens", env=env, cwd=tmp_path)
    assert code != 0 and stdout == ""
    assert stderr.count("\n") == 1 and "AUTHNOTIFY_TOKEN_KEYS" in stderr
