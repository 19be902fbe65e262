"""What must never be shown: secret-named fields (tokens, auth codes, keys, passwords) and URL passwords.

Used by the log processor, by the dead-letter reasons and wherever a URL is printed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import orjson
from yarl import URL

REDACTED = "[redacted]"

# accessToken, access_token, ACCESS-TOKEN, refreshToken, authCode, auth_code, ... whatever the case.
_SECRET_FIELD = re.compile(r"^(access|refresh)[_-]?token$|^auth[_-]?code$|secret|private[_-]?key|password",
                           re.IGNORECASE)


@functools.lru_cache(maxsize=4096)  # field names are few; this runs for every field of every log line
def is_secret_field(name: str) -> bool:
    return bool(_SECRET_FIELD.search(name))


_SCALARS = (str, int, float, bool, type(None))
# Log values nested deeper than this are not walked (nor shown): no recursion limit is ever reached here.
REDACT_MAX_DEPTH = 32
TOO_DEEP = "[too deep]"


def redact(value: Any, _depth: int = 0) -> Any:
    """A copy of ``value`` with every secret-named field, at any depth, replaced by a marker."""
    if type(value) in _SCALARS:  # the common case, without the slower isinstance checks below
        return value
    if _depth >= REDACT_MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, Mapping):
        return {k: (REDACTED if isinstance(k, str) and is_secret_field(k) else redact(v, _depth + 1))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, _depth + 1) for v in value)
    return value


def secret_values(body: bytes) -> list[str]:
    """Values of secret-named fields (accessToken, authCode, ...) anywhere in a JSON body, at any depth.

    Walked with a stack, not recursion: a body nested a thousand levels deep (orjson reads up to 1,024) must
    not raise RecursionError in the code that describes why it failed."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    found: list[str] = []
    pending: list[Any] = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and is_secret_field(key) and isinstance(item, str) and item:
                    found.append(item)
                else:
                    pending.append(item)
        elif isinstance(value, list):
            pending.extend(value)
    return found


def mask_secret_values(text: str, body: bytes) -> str:
    """``text`` with every secret value that ``body`` holds replaced by the marker."""
    return mask_values(text, longest_first(secret_values(body)))


def longest_first(secrets: list[str]) -> list[str]:
    """A secret that contains another is masked before it (or a piece of it would show)."""
    return sorted(secrets, key=len, reverse=True)


def mask_values(text: str, secrets: list[str]) -> str:
    """``text`` with each of ``secrets`` (longest first) replaced by the marker."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


# A secret-named field written into free text: accessToken=abc, "refreshToken": "abc", 'authCode': 'a b',
# auth_code: abc. The name and the punctuation stay; the value (quoted, or up to a separator) is masked.
_SECRET_IN_TEXT = re.compile(
    r"""(?P<name>\b(?:access|refresh)[_-]?token|\bauth[_-]?code|\b\w*secret\w*|\bprivate[_-]?key|\bpassword)"""
    r"""(?P<sep>["']?\s*[=:]\s*)(?:"[^"]*"|'[^']*'|[^"'\s,;)}\]]+)""",
    re.IGNORECASE,
)


def mask_secret_text(text: str) -> str:
    """``text`` with the value of every secret-named ``name=value`` or ``"name": "value"`` masked."""
    return _SECRET_IN_TEXT.sub(lambda match: f"{match['name']}{match['sep']}{REDACTED}", text)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``; anything unparsable is not shown at all."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "<invalid url>"
    return str(parsed.with_password("***")) if parsed.password else url
