"""Database TLS (issue 7): the ``sslmode``/``ssl`` options of AUTHNOTIFY_DATABASE_URL apply to every
connection, the SQLAlchemy engine's and the raw asyncpg pool's of the fast INSERT alike.

The shared PostgreSQL is not to be reconfigured, so this module starts a PostgreSQL of its own (the installed
binaries, a temporary data directory, a free port) that accepts TLS connections only (``hostssl`` alone in
pg_hba.conf), with a server certificate signed by a CA made here with openssl. A connection without TLS is
refused by that server, so a path that falls back to plain text fails these tests instead of passing quietly.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from authnotify.config import TokenKeys
from authnotify.domain.authorizations import TokenGrant
from authnotify.errors import StoreError
from authnotify.store import SqlStore
from authnotify.store.engine import parse_url, postgres_target
from authnotify.store.postgres import NewGrantInserter
from tests.certificates import make_test_certificates

pytestmark = pytest.mark.slow
PASSWORD = "tls-test-password"


@dataclass(frozen=True)
class TlsPostgres:
    port: int
    ca: Path
    other_ca: Path

    def url(self, options: str, scheme: str = "postgresql+asyncpg") -> str:
        return f"{scheme}://postgres:{PASSWORD}@localhost:{self.port}/postgres?{options}"


def _run(command: list[str], cwd: Path | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr[-2000:]}"


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    assert found, f"PostgreSQL's {name} is not installed (scripts/ensure-postgres.sh installs it)"
    return str(found[-1])


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[TlsPostgres]:
    # Not pytest's tmp_path: its parents are private to root, and the server runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="authnotify-tls-postgres-"))
    try:
        yield from _serve(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _serve(root: Path) -> Iterator[TlsPostgres]:
    certificates = make_test_certificates(root)
    data = root / "data"
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        as_postgres = ["runuser", "-u", "postgres", "--"]
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres")
        for name in ("server.key", "server.pem"):
            shutil.chown(root / name, "postgres")
    os.chmod(root / "server.key", 0o600)
    (root / "pw").write_text(PASSWORD + "\n")
    if as_postgres:
        shutil.chown(root / "pw", "postgres")
    _run([*as_postgres, _binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
          f"--pwfile={root / 'pw'}"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
                   f"ssl = on\nssl_cert_file = '{root / 'server.pem'}'\nssl_key_file = '{root / 'server.key'}'\n")
    (data / "pg_hba.conf").write_text("local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n")
    log = root / "server.log"
    if as_postgres:
        log.touch()
        shutil.chown(log, "postgres")
    _run([*as_postgres, _binary("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"])
    try:
        yield TlsPostgres(port, certificates.ca, certificates.other_ca)
    finally:
        subprocess.run([*as_postgres, _binary("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)


def _grant() -> TokenGrant:
    return TokenGrant(provider="aps", access_token=f"tls-{uuid.uuid4().hex}", auth_client_id="C-1")


@pytest.mark.parametrize("options", [
    "sslmode=verify-full&sslrootcert={ca}",
    "sslmode=verify-ca&sslrootcert={ca}",
    "ssl=require",
    "sslmode=require",
], ids=["verify-full", "verify-ca", "ssl=require", "sslmode=require"])
@pytest.mark.parametrize("scheme", ["postgresql+asyncpg", "postgresql"])
async def test_the_engine_and_the_fast_path_both_connect_with_tls(tls_postgres: TlsPostgres, options: str,
                                                                   scheme: str) -> None:
    url = tls_postgres.url(options.format(ca=tls_postgres.ca), scheme)
    store = await SqlStore.connect(url, TokenKeys([Fernet.generate_key().decode()]))  # migrations: the engine
    try:
        transition = await store.record_tokens(_grant())  # a new row: the raw asyncpg pool's INSERT
        assert transition.changed
        assert store._fast_insert is not None and store._fast_insert._pool is not None
        assert (await store.get_authorization(transition.authorization.accessTokenFingerprint)) is not None
    finally:
        await store.close()


async def test_a_server_certificate_from_another_ca_is_refused_by_both(tls_postgres: TlsPostgres) -> None:
    url = tls_postgres.url(f"sslmode=verify-full&sslrootcert={tls_postgres.other_ca}")
    with pytest.raises(StoreError, match="(?i)certificate"):
        await SqlStore.connect(url, TokenKeys([Fernet.generate_key().decode()]))
    inserter = NewGrantInserter(postgres_target(parse_url(url)), "test")
    try:
        with pytest.raises(StoreError, match="(?i)certificate"):
            await inserter.insert([], now=__import__("datetime").datetime.now())
    finally:
        await inserter.close()


async def test_sslmode_disable_is_applied_not_ignored(tls_postgres: TlsPostgres) -> None:
    """The server takes TLS only: a URL that says disable fails, which shows the option reaches the driver."""
    with pytest.raises(StoreError):
        await SqlStore.connect(tls_postgres.url("sslmode=disable"), None)


def test_an_unknown_sslmode_is_refused_in_one_line() -> None:
    with pytest.raises(StoreError, match="sslmode 'sometimes'"):
        postgres_target(parse_url("postgresql://u:p@h/db?sslmode=sometimes"))
    target = postgres_target(parse_url("postgresql://u:p@h:5433/db?sslmode=require&application_name=x"))
    assert target.url.drivername == "postgresql+asyncpg"
    assert dict(target.url.query) == {"application_name": "x"}
    assert target.asyncpg_arguments()["port"] == 5433 and target.asyncpg_arguments()["ssl"] is target.tls
