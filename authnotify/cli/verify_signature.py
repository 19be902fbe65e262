"""``authnotify verify-signature``: checks a captured notification the way the ingress would, and says which
part fails (:mod:`authnotify.alipay.verification`). Headers are read one ``Name: value`` a line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from authnotify.alipay.notifications import NOTIFY_PATHS, signed_path
from authnotify.alipay.verification import explain_notification_signature
from authnotify.config import Settings
from authnotify.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CommandError


def _read(source: str, what: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise CommandError(f"authnotify: cannot read the {what} from {source} ({exc.strerror or exc})",
                           EXIT_USAGE) from None


def parse_header_lines(text: str) -> dict[str, str]:
    """``Name: value`` a line (as curl -v, a proxy log or a browser shows them); other lines are refused."""
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith(("POST ", "HTTP/")):  # a request or status line may be pasted too
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or " " in name.strip():
            raise CommandError(f"authnotify: headers line {number} is not 'Name: value'", EXIT_USAGE)
        headers[name.strip()] = value.strip()
    return headers


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.headers == "-" and args.body == "-":
        raise CommandError("authnotify: --headers and --body cannot both be read from stdin", EXIT_USAGE)
    keys = settings.alipay_public_keys(args.provider)
    client_id = str(getattr(settings, f"{args.provider}_client_id"))
    headers = parse_header_lines(_read(args.headers, "headers").decode("utf-8", "surrogateescape"))
    body = _read(args.body, "body")
    plain = NOTIFY_PATHS[args.provider]
    expected = signed_path(plain, settings.notify_path_prefix)
    candidates = [candidate for candidate in (args.path, plain, expected) if candidate]
    verdict = explain_notification_signature(
        keys=keys, client_id=client_id, path=expected, headers=headers, body=body,
        tolerance_seconds=settings.request_time_tolerance, other_paths=candidates,
    )
    if args.json:
        print(json.dumps({"valid": verdict.valid, "failed": verdict.part, "detail": verdict.detail or None}))
    else:
        print(verdict.line())
    return EXIT_OK if verdict.valid else EXIT_FAILURE
