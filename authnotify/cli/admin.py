"""``authnotify topology``, ``migrate`` and ``reencrypt-tokens``."""

from __future__ import annotations

from authnotify.config import Settings
from authnotify.errors import EXIT_OK, CommandError, StoreError
from authnotify.messaging.connection import command_connection
from authnotify.messaging.topology import build_topology
from authnotify.store import open_store
from authnotify.store.migrations import upgrade_database


async def declare_topology_command(settings: Settings) -> int:
    topology = build_topology(settings)
    async with command_connection(settings.broker_url(), topology):
        pass
    print(f"declared {len(topology.exchanges())} exchanges and {len(topology.queues())} queues "
          f"in namespace {topology.namespace}")
    return EXIT_OK


async def migrate_command(settings: Settings) -> int:
    try:
        revision = await upgrade_database(settings.store_url())
    except StoreError as exc:
        raise CommandError(f"authnotify: {exc}") from None
    except OSError as exc:
        raise CommandError(f"authnotify: database unreachable ({type(exc).__name__})") from None
    print(f"database schema at revision {revision}")
    return EXIT_OK


async def reencrypt_tokens_command(settings: Settings) -> int:
    """After putting a new key first in AUTHNOTIFY_TOKEN_KEYS: rewrite every stored token under it, so the
    old keys can then be dropped from the list."""
    token_keys = settings.require_token_keys()
    try:
        store = await open_store(settings.store_url(), token_keys)
        try:
            count = await store.reencrypt_tokens()
        finally:
            await store.close()
    except StoreError as exc:
        raise CommandError(f"authnotify: {exc}") from None
    print(f"re-encrypted the tokens of {count} authorizations with the first key of AUTHNOTIFY_TOKEN_KEYS")
    return EXIT_OK
