"""The ``authnotify`` command: every subcommand and its arguments, in one place.

Each subcommand's work lives in the module that runs it (the services in their packages, the operator
commands beside this file, ``dev`` and ``simulate`` in :mod:`authnotify.devtools`); this file only parses,
configures and maps failures to one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from authnotify import __version__
from authnotify.config import Need, Settings, check_needs, load_settings
from authnotify.config.settings import unknown_variables
from authnotify.config.values import duration, instant, positive_int
from authnotify.domain.authorizations import STATUSES
from authnotify.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CommandError, ConfigError
from authnotify.messaging.topology import CONSUMER_NAMES

# What each operator command reads of the configuration, checked before it starts (the services declare
# their own: authnotify.ingress.server.INGRESS_NEEDS, each consumer's line in authnotify.workers.registry,
# authnotify.scheduler.process.SCHEDULER_NEEDS, authnotify.api.server.API_NEEDS). A subcommand with needs of
# its own has its own line ("authorizations revoke"); `api-keys create` reads no configuration at all.
COMMAND_NEEDS: dict[str, frozenset[Need]] = {
    "topology": frozenset({Need.BROKER}),
    "migrate": frozenset({Need.DATABASE}),
    "reencrypt-tokens": frozenset({Need.DATABASE, Need.TOKEN_KEYS}),
    "dlq": frozenset({Need.BROKER}),
    "authorizations": frozenset({Need.DATABASE}),  # lists and shows; nothing is decrypted
    # Queues the revocation with confirms; the revocations worker holds the keys that revoke at Alipay.
    "authorizations revoke": frozenset({Need.DATABASE, Need.BROKER}),
    "verify-signature": frozenset(),  # the provider's client id and Alipay public key, read when it runs
}


def command_needs(args: argparse.Namespace) -> frozenset[Need]:
    """The needs of the operator command ``args`` names: its subcommand's line, else its command's."""
    subcommand = getattr(args, "auth_command", None) if args.command == "authorizations" else None
    if subcommand is not None and f"{args.command} {subcommand}" in COMMAND_NEEDS:
        return COMMAND_NEEDS[f"{args.command} {subcommand}"]
    return COMMAND_NEEDS.get(args.command, frozenset())


def _consumer_name(value: str) -> str:
    if value not in CONSUMER_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown worker {value!r} (choose from {', '.join(CONSUMER_NAMES)})"
        )
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise CommandError(f"{self.prog}: {message}", EXIT_USAGE)


def _queue_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("queues", nargs="*", type=_consumer_name, metavar="QUEUE",
                        help=f"the consumers whose dead letters to {verb} ({', '.join(CONSUMER_NAMES)}; "
                             "default: all)")


def _filter_arguments(parser: argparse.ArgumentParser) -> None:
    """The dead-letter filters, the same as the internal API's (GET /v1/dlq, POST /v1/dlq/replay)."""
    parser.add_argument("--merchant", metavar="ID",
                        help="only messages about this merchant: their referenceMerchantId, else their "
                             "authClientId (default: any merchant)")
    parser.add_argument("--since", type=instant, metavar="ISO-8601",
                        help="only messages dead-lettered at or after this time, e.g. 2026-11-23T09:00:00Z "
                             "(UTC when it has no offset; default: any time)")
    parser.add_argument("--reason", metavar="TEXT",
                        help="only messages whose reason contains TEXT, in any case (default: any reason)")


def _json_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as one JSON document on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="authnotify", description="Alipay authorization notification pipeline: the ingress, "
                     "the workers, the scheduler, the internal API and the operator commands. Configuration "
                     "comes from AUTHNOTIFY_* variables (and a .env file).")
    parser.add_argument("--version", action="version", version=f"authnotify {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                                     help="what to run (authnotify COMMAND --help tells more)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help)

    ingress = command("ingress",
                      "run the HTTP ingress (Alipay's notifications, on AUTHNOTIFY_HTTP_HOST:AUTHNOTIFY_HTTP_PORT)")
    ingress.add_argument("--processes", type=positive_int, metavar="N",
                         help="ingress processes sharing the port, each with its own broker connection, under one "
                              "supervisor that serves their /metrics (default: AUTHNOTIFY_INGRESS_PROCESSES, "
                              "else 1: one process, no supervisor)")
    ingress.add_argument("--supervised", action="store_true",
                         help="run as one of the processes of --processes N: the supervisor passes it, not people")
    command("scheduler", "publish due token refreshes, expiries and expiry warnings")
    command("api", "serve the internal API and the operator console (AUTHNOTIFY_API_HOST:AUTHNOTIFY_API_PORT)")
    api_keys = command("api-keys", "API keys for the internal API and the console")
    api_key_commands = api_keys.add_subparsers(dest="api_keys_command", required=True, parser_class=_Parser,
                                               metavar="SUBCOMMAND", help="what to do with API keys")
    api_key_create = api_key_commands.add_parser(
        "create", help="print a new random key once, and the entry to add to AUTHNOTIFY_API_KEYS_FILE",
        description="print a new random key once, and the entry to add to AUTHNOTIFY_API_KEYS_FILE")
    api_key_create.add_argument("name", metavar="NAME", help="the key's name, as the audit log shows it")
    api_key_create.add_argument("--scope", dest="scopes", action="append", required=True, metavar="S",
                                help="a scope the key grants (repeat for several; required): "
                                     "authorizations:read, tokens:read, authorizations:revoke, dlq:read, dlq:write")
    worker = command("worker", f"run consumers (none named = all {len(CONSUMER_NAMES)})")
    worker.add_argument("names", nargs="*", type=_consumer_name, metavar="NAME",
                        help=f"the consumers to run ({', '.join(CONSUMER_NAMES)}; default: all)")
    command("topology", "declare every exchange and queue (idempotent)")
    command("migrate", "bring the database schema up to date")
    command("reencrypt-tokens", "rewrite stored tokens under the first key of AUTHNOTIFY_TOKEN_KEYS (key rotation)")

    dlq = command("dlq", "inspect, replay and purge dead-lettered messages")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, parser_class=_Parser,
                                      metavar="SUBCOMMAND", help="what to do with the dead letters")
    dlq_list = dlq_commands.add_parser("list", help="dead-lettered messages, without consuming them",
                                       description="dead-lettered messages, without consuming them")
    _queue_arguments(dlq_list, "list")
    _filter_arguments(dlq_list)
    _json_argument(dlq_list, "an array of {id, queue, provider, notifyType, attempts, reason, deadLetteredAt, "
                             "merchant}")
    dlq_replay = dlq_commands.add_parser(
        "replay", help="move dead-lettered messages back to the queue they died in (confirmed before removed)",
        description="move dead-lettered messages back to the queue they died in (confirmed before removed)")
    _queue_arguments(dlq_replay, "replay")
    dlq_replay.add_argument("--id", dest="ids", action="append", default=[], metavar="ID",
                            help="only this message (repeat for several; default: every message)")
    dlq_replay.add_argument("--limit", type=positive_int, metavar="N",
                            help="at most N messages (default: no limit)")
    _filter_arguments(dlq_replay)
    dlq_replay.add_argument("--dry-run", action="store_true", help="show what would be replayed; move nothing")
    _json_argument(dlq_replay, '{"replayed": N}')
    dlq_purge = dlq_commands.add_parser("purge", help="delete dead-lettered messages for good",
                                        description="delete dead-lettered messages for good")
    _queue_arguments(dlq_purge, "purge")
    dlq_purge.add_argument("--id", dest="ids", action="append", default=[], metavar="ID",
                           help="only this message (repeat for several; default: every message)")
    dlq_purge.add_argument("--yes", action="store_true", help="confirm the deletion (required)")
    _json_argument(dlq_purge, '{"purged": N}')

    auths = command("authorizations", "stored authorizations (never raw tokens)")
    auth_commands = auths.add_subparsers(dest="auth_command", required=True, parser_class=_Parser,
                                         metavar="SUBCOMMAND", help="what to do with the authorizations")
    auth_list = auth_commands.add_parser("list", help="list stored authorizations, oldest first",
                                         description="list stored authorizations, oldest first")
    auth_list.add_argument("--status", choices=STATUSES,
                           help=f"only those with this status ({', '.join(STATUSES)}; default: any)")
    auth_list.add_argument("--merchant", metavar="ID",
                           help="only those whose referenceMerchantId or authClientId is ID (default: any)")
    auth_list.add_argument("--expiring-within", type=duration, metavar="DURATION",
                           help="only active ones whose refresh token (or access token, where there is none) "
                                "expires within DURATION, e.g. 24h or 7d (default: any)")
    _json_argument(auth_list, "an array of the authorizations' data objects")
    auth_show = auth_commands.add_parser("show", help="one authorization and its history; exit 1 when none matches",
                                         description="one authorization and its history; exit 1 when none matches")
    auth_show.add_argument("key", metavar="KEY",
                           help="its authorizationId, any accessTokenFingerprint it held, or its referenceAgreementId")
    _json_argument(auth_show, "its data object")
    auth_revoke = auth_commands.add_parser(
        "revoke", help="revoke at Alipay, then cancel (queued, with confirms)",
        description="revoke at Alipay, then cancel: queues the command (with confirms) and prints its commandId")
    auth_revoke.add_argument("key", metavar="KEY",
                             help="its authorizationId, any accessTokenFingerprint it held, or its referenceAgreementId")
    auth_revoke.add_argument("--reason", metavar="TEXT",
                             help="why, at most 256 characters: the authorization.canceled event carries it "
                                  "(default: none)")
    auth_revoke.add_argument("--wait", action="store_true",
                             help="wait (up to 2 minutes) for the outcome; exit 1 if it failed (default: return "
                                  "once queued)")
    _json_argument(auth_revoke, '{"commandId", "authorizationId"} (with --wait, also status and detail)')

    verify = command("verify-signature",
                     "check a captured notification as the ingress would, and say which part fails")
    verify.add_argument("--provider", required=True, choices=("ams", "aps"),
                        help="whose notification it is: ams or aps (required)")
    verify.add_argument("--headers", required=True, metavar="FILE",
                        help="the request's headers, one 'Name: value' a line ('-': stdin; required)")
    verify.add_argument("--body", required=True, metavar="FILE",
                        help="the request's exact body bytes ('-': stdin; required)")
    verify.add_argument("--path", metavar="PATH",
                        help="the path the request was captured at, when it may differ from the notify path "
                             "(default: the notify path with AUTHNOTIFY_NOTIFY_PATH_PREFIX)")
    verify.add_argument("--json", action="store_true", help='print {"valid", "failed", "detail"} as JSON')

    command("dev", "ingress, all workers, the scheduler and the API in one process, with local defaults")
    simulate = command("simulate", "play Alipay against a running ingress")
    from authnotify.devtools import simulate as simulate_module

    simulate_module.add_arguments(simulate)
    return parser


def _run(coroutine_factory: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        runner = asyncio.run
    return runner(coroutine_factory()) or EXIT_OK


def _dispatch(args: argparse.Namespace, settings_factory: Callable[[], Settings]) -> int:
    from authnotify.observability.logging import LEVELS, configure_logging

    command = args.command
    if command == "simulate":
        from authnotify.devtools import simulate

        configure_logging("console", level=logging.WARNING, library_level=logging.CRITICAL + 1)
        return _run(lambda: simulate.run(args))
    if command == "dev":
        from authnotify.devtools import dev

        return _run(lambda: dev.run(args))

    if command == "api-keys":
        from authnotify.cli.admin import create_api_key_command

        return create_api_key_command(args)

    settings = settings_factory()
    check_needs(settings, command_needs(args))
    if command in ("ingress", "worker", "scheduler", "api"):
        from authnotify.observability.tracing import configure_tracing

        configure_logging(settings.log_format, settings.log_level)
        configure_tracing(endpoint=settings.tracing_endpoint(), protocol=settings.tracing_protocol(),
                          service_name=f"authnotify-{command}")
    else:  # a one-shot command: its own warnings only, and one line when it fails (no library chatter)
        configure_logging(settings.log_format, max(LEVELS[settings.log_level], logging.WARNING),
                          library_level=logging.CRITICAL + 1)

    if command == "ingress":
        from authnotify.ingress.server import run_ingress

        processes = args.processes or settings.ingress_processes
        if processes > 1 and not args.supervised:
            from authnotify.ingress.supervisor import run_ingress_processes

            return _run(lambda: run_ingress_processes(settings, processes))
        return _run(lambda: run_ingress(settings, supervised=args.supervised))
    if command == "worker":
        from authnotify.workers.process import run_workers

        return _run(lambda: run_workers(settings, args.names or list(CONSUMER_NAMES)))
    if command == "scheduler":
        from authnotify.scheduler.process import run_scheduler

        return _run(lambda: run_scheduler(settings))
    if command == "api":
        from authnotify.api.server import run_api

        return _run(lambda: run_api(settings))
    if command == "topology":
        from authnotify.cli.admin import declare_topology_command

        return _run(lambda: declare_topology_command(settings))
    if command == "migrate":
        from authnotify.cli.admin import migrate_command

        return _run(lambda: migrate_command(settings))
    if command == "reencrypt-tokens":
        from authnotify.cli.admin import reencrypt_tokens_command

        return _run(lambda: reencrypt_tokens_command(settings))
    if command == "dlq":
        from authnotify.cli import dlq

        return _run(lambda: dlq.run(settings, args))
    if command == "authorizations":
        from authnotify.cli import authorizations

        return _run(lambda: authorizations.run(settings, args))
    if command == "verify-signature":
        from authnotify.cli import verify_signature

        return verify_signature.run(settings, args)
    raise CommandError(f"unknown command {command}", EXIT_USAGE)  # pragma: no cover


def _warn_unknown_variables() -> None:
    for name, closest in unknown_variables(os.environ):
        hint = f" (did you mean {closest}?)" if closest else ""
        print(f"authnotify: warning: unknown variable {name}{hint}; it is ignored", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _warn_unknown_variables()
        code = _dispatch(args, load_settings)
    except CommandError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"authnotify: configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last line of defence: one line, never a traceback
        detail = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(f"authnotify: {type(exc).__name__}{': ' + detail if detail else ''}", file=sys.stderr)
        return EXIT_FAILURE
    return code

