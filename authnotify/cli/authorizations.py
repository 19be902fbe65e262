"""``authnotify authorizations list`` and ``show``: stored authorizations, never raw tokens.

``--json`` prints the ``data`` objects of the merchant events (an array for ``list``, one object for ``show``);
otherwise a table. Reading needs no AUTHNOTIFY_TOKEN_KEYS: nothing here decrypts.
"""

from __future__ import annotations

import argparse
import sys

import orjson
from rich.console import Console
from rich.table import Table

from authnotify.config import Settings
from authnotify.domain.authorizations import AuthorizationData
from authnotify.errors import EXIT_FAILURE, EXIT_OK, CommandError, StoreError
from authnotify.store import open_store

_TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
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
            return _list(await store.list_authorizations(status=args.status, merchant=args.merchant), args.json)
        return _show(await store.get_authorization(args.key), args.key, args.json)
    except StoreError as exc:
        raise CommandError(f"authnotify: {exc}") from None
    finally:
        await store.close()


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


def _show(found: AuthorizationData | None, key: str, as_json: bool) -> int:
    if found is None:
        raise CommandError(f"authnotify: no authorization with fingerprint or referenceAgreementId {key!r}",
                           EXIT_FAILURE)
    if as_json:
        _print_json(found.model_dump(mode="json"))
        return EXIT_OK
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for field, value in found.model_dump().items():
        table.add_row(field, _cell(value))
    _console().print(table)
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
