"""``authnotify authorizations list``, ``show`` and ``revoke``: stored authorizations, never raw tokens.

``--json`` prints the ``data`` objects of the merchant events (an array for ``list``, one object for ``show``);
otherwise a table (``show`` adds the authorization's history). ``revoke`` queues a revocation with confirms
(:mod:`authnotify.operations`, the same as the API) and prints its ``commandId``; ``--wait`` waits for its
outcome. Nothing here needs AUTHNOTIFY_TOKEN_KEYS: nothing here decrypts.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta

import orjson
from rich.console import Console
from rich.table import Table

from authnotify.config import Settings
from authnotify.domain.authorizations import AuthorizationData
from authnotify.domain.events import history
from authnotify.errors import EXIT_FAILURE, EXIT_OK, CommandError, PublishFailed, StoreError
from authnotify.messaging.connection import Broker, command_connection
from authnotify.messaging.publisher import ConfirmedPublisher
from authnotify.messaging.topology import build_topology
from authnotify.operations.authorizations import OperationError, find_authorization, revoke, wait_for_command
from authnotify.store import AuthorizationStore, open_store

WAIT_SECONDS = 120.0  # --wait gives up after this long (the command stays queued, its retries go on)
PUBLISH_TIMEOUT_SECONDS = 10.0

_TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("authorizationId", "Authorization"),
    ("provider", "Provider"),
    ("accessTokenFingerprint", "Fingerprint"),
    ("status", "Status"),
    ("referenceMerchantId", "Merchant"),
    ("authClientId", "Auth client"),
    ("referenceAgreementId", "Agreement"),
    ("userLoginId", "User"),
    ("accessTokenExpiryTime", "Access expires"),
    ("canceledAt", "Canceled at"),
)


async def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        store = await open_store(settings.store_url(), None)
    except StoreError as exc:
        raise CommandError(f"authnotify: {exc}") from None
    try:
        if args.auth_command == "list":
            expiring_before = (datetime.now(UTC) + timedelta(seconds=args.expiring_within)
                               if args.expiring_within else None)
            return _list(await store.list_authorizations(status=args.status, merchant=args.merchant,
                                                         expiring_before=expiring_before), args.json)
        if args.auth_command == "revoke":
            return await _revoke(settings, store, args)
        return await _show(store, args.key, args.json)
    except StoreError as exc:
        raise CommandError(f"authnotify: {exc}") from None
    except OperationError as exc:
        raise CommandError(f"authnotify: {exc}", EXIT_FAILURE) from None
    finally:
        await store.close()


async def _revoke(settings: Settings, store: AuthorizationStore, args: argparse.Namespace) -> int:
    topology = build_topology(settings)
    try:
        async with command_connection(settings.broker_url(), topology) as connection:
            publisher = ConfirmedPublisher(Broker.on_connection(connection, topology), name="revoke",
                                           confirm_timeout=PUBLISH_TIMEOUT_SECONDS)
            try:
                await publisher.wait_ready(PUBLISH_TIMEOUT_SECONDS)
                command = await revoke(store, publisher, topology, args.key, args.reason)
            finally:
                await publisher.close()
    except PublishFailed as exc:
        raise CommandError(f"authnotify: the broker did not take the revocation ({exc}); nothing was queued") from None
    except TimeoutError:
        raise CommandError("authnotify: the broker did not open a channel in time; nothing was queued") from None
    queued = {"commandId": command.commandId, "authorizationId": command.authorizationId}
    if not args.wait:
        if args.json:
            _print_json(queued)
        else:
            print(f"revocation of {command.authorizationId} queued: command {command.commandId}")
        return EXIT_OK
    outcome = await wait_for_command(store, command.commandId, timeout=WAIT_SECONDS)
    if outcome is None or outcome.status == "retrying":
        last = f" (last attempt: {outcome.detail})" if outcome is not None and outcome.detail else ""
        raise CommandError(f"authnotify: revocation {command.commandId} of {command.authorizationId} has no outcome "
                           f"after {WAIT_SECONDS:.0f} s{last}; it stays queued and is retried", EXIT_FAILURE)
    if args.json:
        _print_json({**queued, "status": outcome.status, "detail": outcome.detail})
    if outcome.status == "failed":
        raise CommandError(f"authnotify: revocation {command.commandId} of {command.authorizationId} failed: "
                           f"{outcome.detail}", EXIT_FAILURE)
    if not args.json:
        print(f"revoked {command.authorizationId}: {outcome.detail} (command {command.commandId})")
    return EXIT_OK


def _print_json(value: object) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _list(found: list[AuthorizationData], as_json: bool) -> int:
    if as_json:
        _print_json([item.model_dump(mode="json") for item in found])
        return EXIT_OK
    console = _console()
    if not found:
        console.print("no authorizations")
        return EXIT_OK
    table = Table(title=f"{len(found)} authorization{'s' if len(found) != 1 else ''}")
    for field, title in _TABLE_COLUMNS:
        table.add_column(title, overflow="fold", no_wrap=field in ("provider", "status", "accessTokenFingerprint"))
    for item in found:
        values = item.model_dump()
        table.add_row(*(_cell(values[field]) for field, _ in _TABLE_COLUMNS))
    console.print(table)
    return EXIT_OK


async def _show(store: AuthorizationStore, key: str, as_json: bool) -> int:
    found = await find_authorization(store, key)
    if as_json:
        _print_json(found.model_dump(mode="json"))
        return EXIT_OK
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for field, value in found.model_dump().items():
        table.add_row(field, _cell(value))
    console = _console()
    console.print(table)
    assert found.authorizationId is not None
    timeline = await store.timeline(found.authorizationId)
    if timeline is not None:
        events = Table(title="history", title_justify="left")
        for column in ("createdAt", "type", "accessTokenFingerprint", "id"):
            events.add_column(column, no_wrap=True)
        for entry in history(timeline):
            events.add_row(entry.createdAt, entry.type, _cell(entry.accessTokenFingerprint), entry.id)
        console.print(events)
    return EXIT_OK


def _console() -> Console:
    console = Console()
    # Piped or redirected output has no terminal width to respect: don't fold ids at 80 columns.
    return console if console.is_terminal else Console(width=200)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
