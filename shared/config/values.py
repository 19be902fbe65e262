"""Values people type, in the environment and on the command line: durations and counts.

Each parser raises ``ValueError`` with a short reason; the settings and the argument parser add the name of
the variable or option.
"""

from __future__ import annotations

import argparse
import math
import re
from datetime import UTC, datetime

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``10s``, ``1m``, ``2h``, ``7d``, ``500ms`` in seconds; longer than zero."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text.strip()!r} is not a duration like 10s, 1m, 2h")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text.strip()!r} must be longer than zero")
    return seconds


def parse_durations(text: str) -> tuple[float, ...]:
    """A comma-separated list of durations; empty text is an empty list."""
    text = text.strip()
    if not text:
        return ()
    return tuple(parse_duration(part) for part in text.split(","))


def parse_instant(text: str) -> datetime:
    """An ISO 8601 date or time (``2026-11-23``, ``2026-11-23T09:00``, ``2026-11-23T09:00:00+08:00``,
    ``...Z``), as an aware datetime; without an offset it is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not an ISO 8601 time like 2026-11-23T09:00:00Z") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# --- the TLS modes a database URL may ask for (libpq's sslmode, asyncpg's ssl) ----------------------

NO_TLS_MODES = frozenset({"disable", "false", "0", "no", "off"})
MAYBE_TLS_MODES = frozenset({"allow", "prefer"})
TLS_MODES = frozenset({"require", "true", "1", "yes", "on", "verify-ca", "verify-full"})


def database_tls_mode(url: str) -> str:
    """The ``sslmode`` (or ``ssl``) of a database URL, lower-cased, ``""`` when none; ValueError when unknown."""
    from urllib.parse import parse_qs, urlsplit

    query = parse_qs(urlsplit(url).query)
    mode = (query.get("sslmode") or query.get("ssl") or [""])[-1].strip().lower()
    if mode and mode not in NO_TLS_MODES | MAYBE_TLS_MODES | TLS_MODES:
        raise ValueError(f"sslmode {mode!r} is not one of disable, allow, prefer, require, verify-ca, verify-full")
    return mode


# --- argparse types: a bad value is one line naming the option ------------------------------------


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError("must be zero or more")
    return number


def positive_float(value: str) -> float:
    number = non_negative_float(value)
    if number == 0:
        raise argparse.ArgumentTypeError("must be more than zero")
    return number


def duration(value: str) -> float:
    """An option's duration (``10s``, ``24h``, ``7d``), in seconds."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def instant(value: str) -> datetime:
    """An option's ISO 8601 time (UTC when it has no offset)."""
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
