"""Fixtures: a real RabbitMQ namespace per test, real databases, and key pairs for both sides.

Services come from environment variables first (``AUTHNOTIFY_TEST_RABBITMQ_URL``,
``AUTHNOTIFY_TEST_DATABASE_URL``), then from testcontainers where a Docker engine answers; otherwise the
tests fail with a message saying what to set. They never skip for a missing service.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from authnotify.config import Settings
from authnotify.config.keys import private_key_pem, public_key_pem
from authnotify.messaging.topology import build_topology, declare_topology, delete_topology
from authnotify.store import SqlStore as Store

RABBITMQ_ENV = "AUTHNOTIFY_TEST_RABBITMQ_URL"
DATABASE_ENV = "AUTHNOTIFY_TEST_DATABASE_URL"
QUEUE_TYPE_ENV = "AUTHNOTIFY_TEST_QUEUE_TYPE"

# Tests run on classic queues unless they ask for quorum (or AUTHNOTIFY_TEST_QUEUE_TYPE says so). RabbitMQ
# 3.10.8 has a bug: deleting a quorum queue with at-least-once dead-lettering can crash its dead-letter worker
# in a restart loop that stops the broker's whole dead-letter supervisor, after which no such queue can be
# declared (INTERNAL_ERROR) until the broker application restarts. Production never deletes its queues; tests
# delete a namespace per test. So quorum namespaces are deleted only when the session ends (below), and the
# quorum behaviour is proven by the tests that ask for it (tests/test_topology.py and others).
DEFAULT_TEST_QUEUE_TYPE = os.environ.get(QUEUE_TYPE_ENV, "classic")
_quorum_topologies_to_delete: list[tuple[str, Any]] = []


SERVICE_FIXTURES = {"rabbitmq_url", "postgres_url"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks each test that needs a real service (``services``): it asks for the broker or PostgreSQL, or is
    one of the PostgreSQL cases of a database-parametrized test. ``make test-fast`` runs the others."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if fixtures & SERVICE_FIXTURES or "postgresql" in params.values():
            item.add_marker(pytest.mark.services)


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    url = os.environ.get(RABBITMQ_ENV)
    if url:
        yield url
        return
    if not _docker_available():
        pytest.fail(
            f"No RabbitMQ for the tests: set {RABBITMQ_ENV} (e.g. amqp://guest:guest@127.0.0.1:5672/) "
            "or make a Docker engine available for testcontainers.",
            pytrace=False,
        )
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.13-management") as container:
        params = container.get_connection_params()
        yield f"amqp://guest:guest@{params.host}:{params.port}/"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = os.environ.get(DATABASE_ENV)
    if url:
        yield url
        return
    if not _docker_available():
        pytest.fail(
            f"No PostgreSQL for the tests: set {DATABASE_ENV} "
            "(e.g. postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/test) "
            "or make a Docker engine available for testcontainers.",
            pytrace=False,
        )
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16", driver="asyncpg") as container:
        yield container.get_connection_url()


@dataclass(frozen=True)
class KeyPair:
    private_key: RSAPrivateKey

    @property
    def private_pem(self) -> str:
        return private_key_pem(self.private_key)

    @property
    def public_pem(self) -> str:
        return public_key_pem(self.private_key.public_key())


@dataclass(frozen=True)
class TestKeys:
    ours: KeyPair  # authnotify's own key: signs our answers and requests
    alipay: KeyPair  # the (fake) Alipay's key: signs notifications and gateway responses


@pytest.fixture(scope="session")
def keys() -> TestKeys:
    def generate() -> KeyPair:
        return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    return TestKeys(ours=generate(), alipay=generate())


AMS_CLIENT_ID = "SANDBOX_5YBX2N2ZAMS01234"
APS_CLIENT_ID = "2188120123456789"


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _test_settings(keys: TestKeys, tmp_path: Any, **overrides: Any) -> Settings:
    """Both providers configured with the test keys, fast retries; keyword arguments override."""
    values: dict[str, Any] = {
        "rabbitmq_url": "amqp://guest:guest@127.0.0.1:1/",  # no broker unless the test gives one
        "namespace": f"t{uuid.uuid4().hex[:10]}",
        "queue_type": DEFAULT_TEST_QUEUE_TYPE,
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/authnotify.db",
        "http_host": "127.0.0.1",
        "worker_http_port": 0,
        "ams_client_id": AMS_CLIENT_ID,
        "ams_private_key": keys.ours.private_pem,
        "ams_alipay_public_key": keys.alipay.public_pem,
        "ams_customer_belongs_to": "ALIPAY_CN",
        "aps_client_id": APS_CLIENT_ID,
        "aps_private_key": keys.ours.private_pem,
        "aps_alipay_public_key": keys.alipay.public_pem,
        "retry_delays": "1s,2s",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def offline_settings(keys: TestKeys, tmp_path: Any) -> Callable[..., Settings]:
    """Settings for tests that need no broker (the fast ones): publishing goes to an in-memory publisher."""
    return lambda **overrides: _test_settings(keys, tmp_path, **overrides)


@pytest.fixture
async def make_settings(
    rabbitmq_url: str, namespace: str, keys: TestKeys, tmp_path: Any
) -> AsyncIterator[Callable[..., Settings]]:
    """Settings for this test's namespace on the real broker, both providers configured; keyword arguments
    override.

    Every topology these settings describe is deleted on a fresh connection: classic ones after the test,
    quorum ones when the session ends (see DEFAULT_TEST_QUEUE_TYPE).
    """
    made: list[Settings] = []

    def factory(**overrides: Any) -> Settings:
        settings = _test_settings(keys, tmp_path, **{"rabbitmq_url": rabbitmq_url, "namespace": namespace,
                                                     **overrides})
        made.append(settings)
        return settings

    yield factory

    topologies = {build_topology(s) for s in made}
    classic = [t for t in topologies if t.queue_type.value == "classic"]
    _quorum_topologies_to_delete.extend((rabbitmq_url, t) for t in topologies if t.queue_type.value == "quorum")
    if classic:
        await _delete_topologies(rabbitmq_url, classic)


async def _delete_topologies(rabbitmq_url: str, topologies: Any) -> None:
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        for topology in topologies:
            channel = await connection.channel()
            await delete_topology(channel, topology)
            await channel.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Deletes the quorum namespaces the tests declared, once no test needs the broker any more."""
    import asyncio

    by_url: dict[str, list[Any]] = {}
    for url, topology in _quorum_topologies_to_delete:
        by_url.setdefault(url, []).append(topology)
    for url, topologies in by_url.items():
        try:
            asyncio.run(_delete_topologies(url, set(topologies)))
        except Exception as exc:  # cleanup only: say so, never fail the run for it
            print(f"\nleft quorum test queues behind ({type(exc).__name__}: {exc})")


@pytest.fixture
async def amqp_connection(rabbitmq_url: str, request: pytest.FixtureRequest) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A connection of the test's own, to inspect queues; named after the test."""
    connection = await aio_pika.connect(
        rabbitmq_url, client_properties={"connection_name": f"test:{request.node.name}"[:200]}
    )
    yield connection
    await connection.close()


# --- store fixtures (appended by the store engineer) ------------------------------------------------


@asynccontextmanager
async def fresh_database(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[str]:
    """The URL of an empty database of ``kind``: a temp SQLite file, or a fresh PostgreSQL database on the
    server of ``postgres_url`` (created for this test, dropped after it)."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/store.db"
        return
    import asyncpg
    from sqlalchemy.engine import make_url

    server = make_url(request.getfixturevalue("postgres_url"))
    name = f"authnotify_test_{uuid.uuid4().hex[:12]}"
    admin_dsn = server.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[str]:
    """An empty database of each kind (see :func:`fresh_database`)."""
    async with fresh_database(request.param, request, tmp_path) as url:
        yield url


@pytest.fixture
def token_keys() -> Any:
    """A fresh single-key AUTHNOTIFY_TOKEN_KEYS value, as Settings would hold it."""
    from cryptography.fernet import Fernet

    from authnotify.config import TokenKeys

    return TokenKeys([Fernet.generate_key().decode()])


# --- the worker tests' settings, channel and store (a module's own fixture of the same name wins) --------

@pytest.fixture
def settings(make_settings: Callable[..., Settings], database_url: str) -> Settings:
    """This test's namespace and database (SQLite or PostgreSQL), a fresh token key, fast retries."""
    return make_settings(database_url=database_url, token_keys=Fernet.generate_key().decode(), retry_delays="200ms,400ms")


@pytest.fixture
async def channel(amqp_connection: aio_pika.abc.AbstractConnection, settings: Settings) -> aio_pika.abc.AbstractChannel:
    """A confirming channel on the test's connection, with the namespace's topology declared."""
    opened = await amqp_connection.channel(publisher_confirms=True)
    await declare_topology(opened, build_topology(settings))
    return opened


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    """The test's store, to check what the workers wrote."""
    opened = await Store.connect(settings.store_url(), settings.token_keys)
    yield opened
    await opened.close()


# --- the simulated Alipay gateway and our JSON logs, for the worker tests -------------------------------


@pytest.fixture
async def gateway(keys: TestKeys) -> AsyncIterator[Any]:
    """The sandbox Alipay gateway on a free port: checks our signatures, signs with the fake Alipay's key."""
    from authnotify.devtools.sandbox.alipay_gateway import AlipayGateway, start_alipay_gateway

    running = await start_alipay_gateway(AlipayGateway(
        alipay_private_key=keys.alipay.private_key,
        client_public_key=keys.ours.private_key.public_key(),
        ams_client_id=AMS_CLIENT_ID,
        aps_client_id=APS_CLIENT_ID,
    ))
    yield running
    await running.aclose()


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Our JSON logging (it writes to whatever sys.stderr is, so into this test's capture), at DEBUG; the
    previous configuration is put back after."""
    import logging

    import structlog

    from authnotify.observability.logging import configure_logging

    saved = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    configure_logging("json", level=logging.DEBUG)
    yield
    structlog.configure(**saved)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
