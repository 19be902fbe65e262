"""``authnotify topology`` and ``authnotify migrate``."""

from __future__ import annotations

import asyncio

import aio_pika

from authnotify.cli.main import CommandError
from authnotify.config.settings import Settings
from authnotify.messaging.topology import build_topology, declare_topology

CONNECT_TIMEOUT_SECONDS = 10


async def connect_once(settings: Settings) -> aio_pika.abc.AbstractConnection:
    """A plain connection for a command: fails fast with one line instead of retrying."""
    try:
        return await aio_pika.connect(settings.rabbitmq_url, timeout=CONNECT_TIMEOUT_SECONDS)
    except (OSError, asyncio.TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        raise CommandError(f"authnotify: broker unreachable at {_safe_url(settings.rabbitmq_url)} ({type(exc).__name__})") from None


def _safe_url(url: str) -> str:
    from yarl import URL

    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


async def declare_topology_command(settings: Settings) -> int:
    topology = build_topology(settings)
    connection = await connect_once(settings)
    async with connection:
        channel = await connection.channel()
        try:
            await declare_topology(channel, topology)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            raise CommandError(f"authnotify: a queue exists with other arguments: {exc}") from None
    print(f"declared {len(topology.exchanges())} exchanges and {len(topology.queues())} queues "
          f"in namespace {topology.namespace}")
    return 0


async def migrate_command(settings: Settings) -> int:
    from authnotify.store import StoreError
    from authnotify.store.migrations import upgrade_database

    try:
        revision = await upgrade_database(settings.database_url)
    except StoreError as exc:
        raise CommandError(f"authnotify: {exc}") from None
    except OSError as exc:
        raise CommandError(f"authnotify: database unreachable ({type(exc).__name__})") from None
    print(f"database schema at revision {revision}")
    return 0


async def reencrypt_tokens_command(settings: Settings) -> int:
    """After putting a new key first in AUTHNOTIFY_TOKEN_KEYS: rewrite every stored token under it, so the
    old keys can then be dropped from the list."""
    from authnotify.store import Store, StoreError

    token_keys = settings.require_token_keys()
    try:
        store = await Store.connect(settings.database_url, token_keys)
        try:
            count = await store.reencrypt_tokens()
        finally:
            await store.close()
    except StoreError as exc:
        raise CommandError(f"authnotify: {exc}") from None
    print(f"re-encrypted the tokens of {count} authorizations with the first key of AUTHNOTIFY_TOKEN_KEYS")
    return 0
