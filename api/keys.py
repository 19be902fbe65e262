"""API keys: ``AUTHNOTIFY_API_KEYS_FILE`` (TOML), scopes, and making a new key.

::

    [keys.billing]                       # the key's name: what the audit log says
    sha256 = "<hex SHA-256 of the key>"  # the key itself is never stored
    scopes = ["authorizations:read", "tokens:read"]

A request carries ``Authorization: Bearer <key>``. The presented key is hashed and compared with every
entry in constant time; nothing about it is logged but the name of the entry it matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from authnotify.config import ENV_PREFIX
from authnotify.config.files import named_tables, read_config_file
from authnotify.errors import ConfigError

KEYS_FILE_VARIABLE = f"{ENV_PREFIX}API_KEYS_FILE"
KEY_PREFIX = "ank_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Scope(StrEnum):
    AUTHORIZATIONS_READ = "authorizations:read"
    TOKENS_READ = "tokens:read"
    AUTHORIZATIONS_REVOKE = "authorizations:revoke"
    DLQ_READ = "dlq:read"
    DLQ_WRITE = "dlq:write"


SCOPES: tuple[str, ...] = tuple(scope.value for scope in Scope)


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    scopes: frozenset[str]

    def __repr__(self) -> str:
        return f"ApiKey(name={self.name!r}, scopes={sorted(self.scopes)})"


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[ApiKey, ...]

    def find(self, presented: str) -> ApiKey | None:
        """The entry whose hash matches; every entry is compared, each in constant time."""
        return self.find_digest(hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest())

    def find_digest(self, digest: str) -> ApiKey | None:
        """The entry with this SHA-256 (what a console session keeps instead of the key), in constant time."""
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(digest.encode(), key.sha256.encode()):
                found = key
        return found


def parse_api_keys(text: str, source: str = KEYS_FILE_VARIABLE) -> ApiKeys:
    """The keys of a TOML document; :class:`ConfigError` with one line naming ``source`` and the entry."""
    entries = named_tables(text, source, "keys", "[keys.<name>] with sha256 and scopes")
    keys: list[ApiKey] = []
    for name, entry in entries.items():
        keys.append(_entry(name, entry, source))
    hashes = [key.sha256 for key in keys]
    if len(set(hashes)) != len(hashes):
        raise ConfigError(f"{source}: two entries have the same sha256")
    return ApiKeys(tuple(keys))


def _entry(name: str, entry: Any, source: str) -> ApiKey:
    where = f"{source}: [keys.{name}]"
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"{where} the name must be letters, digits, '_', '.', '-' (at most 64)")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table with sha256 and scopes")
    unknown = sorted(set(entry) - {"sha256", "scopes"})
    if unknown:
        raise ConfigError(f"{where} unknown key {unknown[0]!r} (allowed: scopes, sha256)")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
        raise ConfigError(f"{where} sha256 must be 64 hex digits (the SHA-256 of the key)")
    scopes = entry.get("scopes")
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise ConfigError(f"{where} scopes must be a non-empty list of scopes")
    wrong = [s for s in scopes if s not in SCOPES]
    if wrong:
        raise ConfigError(f"{where} unknown scope {wrong[0]!r} (known: {', '.join(SCOPES)})")
    return ApiKey(name=name, sha256=digest.lower(), scopes=frozenset(scopes))


def load_api_keys(path: Path | str | None) -> ApiKeys:
    if path is None:
        raise ConfigError(f"{KEYS_FILE_VARIABLE}: required by the api (a TOML file of [keys.<name>] entries; "
                          "make one with `authnotify api-keys create`)")
    text, source = read_config_file(path, KEYS_FILE_VARIABLE)
    return parse_api_keys(text, source)


@dataclass(frozen=True)
class NewKey:
    name: str
    key: str
    scopes: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()

    def toml_entry(self) -> str:
        scopes = ", ".join(f'"{scope}"' for scope in self.scopes)
        return f'[keys.{self.name}]\nsha256 = "{self.sha256}"\nscopes = [{scopes}]\n'

    def __repr__(self) -> str:
        return f"NewKey(name={self.name!r}, scopes={list(self.scopes)})"


def new_api_key(name: str, scopes: list[str]) -> NewKey:
    """A random key (256 bits) for ``name``; ValueError naming what is wrong with the name or a scope."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
    if not scopes:
        raise ValueError("give at least one --scope")
    wrong = [s for s in scopes if s not in SCOPES]
    if wrong:
        raise ValueError(f"unknown scope {wrong[0]!r} (known: {', '.join(SCOPES)})")
    return NewKey(name, KEY_PREFIX + secrets.token_urlsafe(32), tuple(dict.fromkeys(scopes)))
