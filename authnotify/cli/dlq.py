"""``authnotify dlq list|replay|purge``: the dead-letter queues, shown and operated from the command line.

The work is :class:`~authnotify.messaging.deadletters.DeadLetterQueues`'s; this module prints what it
returns (a table, or ``--json``) and a progress bar on a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from authnotify.config import Settings
from authnotify.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CommandError, PublishFailed
from authnotify.messaging.deadletters import DeadLetter, DeadLetterFilter, DeadLetterQueues, Selection
from authnotify.messaging.topology import Consumer, build_topology


@contextmanager
def _progress(description: str) -> Iterator[Any]:
    """A progress callback for DeadLetterQueues: a bar per queue on a terminal, nothing otherwise."""
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        tasks: dict[Consumer, TaskID] = {}

        def report(consumer: Consumer, total: int | None) -> None:
            if total is not None:
                tasks[consumer] = progress.add_task(f"{description} {consumer.value}", total=total)
            elif consumer in tasks:
                progress.advance(tasks[consumer])

        yield report


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, ensure_ascii=False) + "\n")


def _table(letters: list[DeadLetter], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("id", "queue", "provider", "notifyType", "attempts", "reason", "deadLetteredAt", "merchant"):
        table.add_column(column, overflow="fold", no_wrap=column in ("id", "deadLetteredAt"))
    for letter in letters:
        table.add_row(*("" if value is None else str(value) for value in asdict(letter).values()))
    return table


def _print_table(letters: list[DeadLetter], title: str) -> None:
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(_table(letters, title))


def _plural(count: int) -> str:
    return "" if count == 1 else "s"


async def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.dlq_command == "purge" and not args.yes:  # refused before anything is opened
        raise CommandError("authnotify: dlq purge deletes messages for good; add --yes to confirm", EXIT_USAGE)
    try:
        async with DeadLetterQueues.open(settings.broker_url(), build_topology(settings),
                                         operation=f"dlq {args.dlq_command}") as queues:
            return await _run(queues, args)
    except PublishFailed as exc:
        # Whatever was replayed before this is confirmed; the rest is still in its DLQ.
        raise CommandError(f"authnotify: the broker refused a replayed message ({exc})") from None


def _filter(args: argparse.Namespace) -> DeadLetterFilter:
    """--merchant, --since, --reason: the filter the API's dead-letter routes take too."""
    return DeadLetterFilter(merchant=getattr(args, "merchant", None) or None, since=getattr(args, "since", None),
                            reason=getattr(args, "reason", None) or None)


async def _run(queues: DeadLetterQueues, args: argparse.Namespace) -> int:
    names: list[str] = list(args.queues or [])
    if args.dlq_command == "list":
        letters = await queues.list(names, Selection(filter=_filter(args)))
        if args.json:
            _print_json([asdict(letter) for letter in letters])
        elif letters:
            _print_table(letters, f"{len(letters)} dead-lettered message{_plural(len(letters))}")
        else:
            print("no dead-lettered messages")
        return EXIT_OK
    if args.dlq_command == "replay":
        selection = Selection(args.ids, args.limit, _filter(args))
        with _progress("replaying") as progress:
            letters = await queues.replay(names, selection, dry_run=args.dry_run, progress=progress)
        missing = [] if args.limit else sorted(set(args.ids) - {letter.id for letter in letters})
        if args.json:
            _print_json({"replayed": len(letters)})
        else:
            verb = "would replay" if args.dry_run else "replayed"
            if letters:
                _print_table(letters, verb)
            print(f"{verb} {len(letters)} message{_plural(len(letters))}")
        if missing:
            where = "in the dead-letter queues" if selection.filter.empty else "among the filtered dead letters"
            print(f"authnotify: not found {where}: {', '.join(missing)}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    if args.dlq_command == "purge":
        with _progress("purging") as progress:
            count = await queues.purge(names, Selection(args.ids), progress=progress)
        if args.json:
            _print_json({"purged": count})
        else:
            print(f"purged {count} message{_plural(count)}")
        return EXIT_OK
    raise CommandError(f"authnotify: unknown dlq command {args.dlq_command}", EXIT_USAGE)  # pragma: no cover
