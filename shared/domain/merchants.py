"""The merchant webhook registry (docs/events.md): which endpoint receives which event.

``AUTHNOTIFY_MERCHANTS_FILE`` is TOML::

    [merchants.default]                  # used when no other entry matches
    url = "https://merchant.example/webhooks/alipay-authorization"
    secret = "whsec_..."                 # whsec_ + base64 of 24 to 64 random bytes

    [merchants."218823863726123456780"]  # matched against referenceMerchantId, then authClientId
    url = "https://other.example/hooks"
    secrets = ["whsec_new...", "@/run/secrets/merchant-old"]  # rotation: every listed secret signs
                                         # (instead of `secret`); "@file" reads the secret from a file
    events = ["authorization.canceled"]  # optional filter; default: every type
    allow_unbinding = false              # optional: refuse Alipay+'s consultUnbinding; default: allowed

The file is validated once, at start; a bad file stops the process with one line naming
AUTHNOTIFY_MERCHANTS_FILE and the entry (never a secret). A secret given as ``@/path`` is read from that file
only where events are signed (the merchant-events worker): the ingress, which reads the registry for its
``allow_unbinding`` flags, then holds no merchant secret, and the file need not be mounted there.

An entry that matched an event is authoritative: when its ``events`` filter leaves the event's type out, the
event is not delivered anywhere (it does not fall through to the default); the worker acknowledges it and
counts it as filtered.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from standardwebhooks import Webhook
from yarl import URL

from authnotify.config import ENV_PREFIX, Settings
from authnotify.config.files import named_tables, read_config_file
from authnotify.domain.authorizations import AuthorizationData
from authnotify.domain.events import EVENT_TYPES
from authnotify.errors import ConfigError

MERCHANTS_FILE_VARIABLE = f"{ENV_PREFIX}MERCHANTS_FILE"
DEFAULT_ENTRY = "default"
SECRET_PREFIX = "whsec_"
SECRET_MIN_BYTES = 24
SECRET_MAX_BYTES = 64
_ENTRY_KEYS = frozenset({"url", "secret", "secrets", "events", "allow_unbinding"})


@dataclass(frozen=True)
class Endpoint:
    """One registry entry: where to POST and how to sign. Its repr never shows a secret."""

    name: str  # "default" or the merchant id the entry is keyed by
    url: str
    secrets: tuple[str, ...] = field(repr=False)  # every one signs (rotation: new and old side by side)
    events: frozenset[str] | None = None  # None: every type
    allow_unbinding: bool = True

    def accepts(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events

    @property
    def webhooks(self) -> tuple[Webhook, ...]:
        return tuple(Webhook(secret) for secret in self.secrets)


@dataclass(frozen=True)
class MerchantRegistry:
    entries: dict[str, Endpoint]  # by merchant id, the default excluded
    default: Endpoint | None

    def endpoint_for(self, data: AuthorizationData) -> Endpoint | None:
        """The entry for referenceMerchantId, else for authClientId, else the default, else None.

        The caller still asks :meth:`Endpoint.accepts` whether the entry wants the event's type.
        """
        for merchant_id in (data.referenceMerchantId, data.authClientId):
            if merchant_id and merchant_id in self.entries:
                return self.entries[merchant_id]
        return self.default

    def __len__(self) -> int:
        return len(self.entries) + (self.default is not None)

    def unbinding_policy(self) -> UnbindingPolicy:
        return UnbindingPolicy(
            by_merchant={name: endpoint.allow_unbinding for name, endpoint in self.entries.items()},
            default=self.default.allow_unbinding if self.default is not None else True,
        )


@dataclass(frozen=True)
class UnbindingPolicy:
    """Whether a merchant lets the user unbind from the wallet side (Alipay+ ``consultUnbinding``).

    Only the registry's ``allow_unbinding`` flags, none of its URLs or secrets: the ingress answers from this.
    """

    by_merchant: dict[str, bool]
    default: bool = True

    def allows(self, reference_merchant_id: str | None, auth_client_id: str | None) -> bool:
        """The entry for referenceMerchantId, else for authClientId, else the default; absent means allowed."""
        for merchant_id in (reference_merchant_id, auth_client_id):
            if merchant_id and merchant_id in self.by_merchant:
                return self.by_merchant[merchant_id]
        return self.default


ALLOW_EVERY_UNBINDING = UnbindingPolicy(by_merchant={}, default=True)


def _entry_label(name: str) -> str:
    return f"merchants.{name}" if name.isidentifier() else f'merchants."{name}"'


def _decode_secret(secret: str) -> bytes | None:
    if not secret.startswith(SECRET_PREFIX):
        return None
    try:
        raw = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw


def _check_secret(which: str, secret: Any, fail: Callable[[str], NoReturn], *, read_files: bool) -> str:
    """The secret (``whsec_...``), read from its file when given as ``@/path`` and ``read_files``."""
    if not isinstance(secret, str) or not secret.strip():
        fail(f"{which} must be whsec_ followed by base64 of 24 to 64 random bytes, or @/path/to/a/file holding one")
    secret = secret.strip()
    if secret.startswith("@"):
        if not read_files:
            return secret  # a reference, left unread: this process signs nothing
        path = Path(secret[1:]).expanduser()
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"{which}: cannot read {path} ({getattr(exc, 'strerror', None) or type(exc).__name__})")
    raw = _decode_secret(secret)
    if raw is None:
        fail(f"{which} must be whsec_ followed by base64 of 24 to 64 random bytes")
    if not SECRET_MIN_BYTES <= len(raw) <= SECRET_MAX_BYTES:
        fail(f"{which} decodes to {len(raw)} bytes; it must be 24 to 64")
    return secret


def _endpoint(name: str, entry: Any, fail: Callable[[str], NoReturn], *, read_secret_files: bool) -> Endpoint:
    if not isinstance(entry, dict):
        fail("must be a table with url and secret")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        fail(f"unknown key {unknown[0]!r} (allowed: allow_unbinding, events, secret, secrets, url)")

    url = entry.get("url")
    if not isinstance(url, str) or not url.strip():
        fail("url is required (an http or https URL)")
    try:
        parsed = URL(url.strip())
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        fail("url must be an absolute http or https URL")

    if "secret" in entry and "secrets" in entry:
        fail("give secret or secrets, not both")
    given_secrets = [entry["secret"]] if "secret" in entry else entry.get("secrets")
    if not isinstance(given_secrets, list) or not given_secrets:
        fail("secret is required (whsec_ followed by base64 of 24 to 64 random bytes), or secrets = [...]")
    secrets = tuple(
        _check_secret("secret" if "secret" in entry else f"secrets[{position}]", secret, fail,
                      read_files=read_secret_files)
        for position, secret in enumerate(given_secrets, start=1)
    )

    events: frozenset[str] | None = None
    if "events" in entry:
        listed = entry["events"]
        if not isinstance(listed, list) or not all(isinstance(e, str) for e in listed):
            fail("events must be a list of event types")
        wrong = [e for e in listed if e not in EVENT_TYPES]
        if wrong:
            fail(f"events: unknown type {wrong[0]!r} (known: {', '.join(EVENT_TYPES)})")
        events = frozenset(listed)
    allow_unbinding = entry.get("allow_unbinding", True)
    if not isinstance(allow_unbinding, bool):
        fail("allow_unbinding must be true or false")
    return Endpoint(name=name, url=url.strip(), secrets=secrets, events=events, allow_unbinding=allow_unbinding)


def parse_merchant_registry(text: str, source: str = MERCHANTS_FILE_VARIABLE, *,
                            read_secret_files: bool = True) -> MerchantRegistry:
    """The registry of a TOML document; :class:`ConfigError` with one line naming ``source`` and the entry.

    ``read_secret_files=False``: ``@/path`` secrets stay unread references (for a process that signs nothing).
    """

    merchants = named_tables(text, source, "merchants", "[merchants.default] or [merchants.\"<id>\"]")

    entries: dict[str, Endpoint] = {}
    default: Endpoint | None = None
    for name, entry in merchants.items():
        label = _entry_label(name)

        def fail(message: str, label: str = label) -> NoReturn:
            raise ConfigError(f"{source}: [{label}] {message}")

        if not name.strip():
            fail("the merchant id must not be empty")
        endpoint = _endpoint(name, entry, fail, read_secret_files=read_secret_files)
        if name == DEFAULT_ENTRY:
            default = endpoint
        else:
            entries[name] = endpoint
    return MerchantRegistry(entries=entries, default=default)


def load_merchant_registry(path: Path | str, *, read_secret_files: bool = True) -> MerchantRegistry:
    text, source = read_config_file(path, MERCHANTS_FILE_VARIABLE)
    return parse_merchant_registry(text, source, read_secret_files=read_secret_files)


def merchant_registry_from_settings(settings: Settings) -> MerchantRegistry:
    """The registry the merchant-events worker needs: required there, so unset is a start failure."""
    if settings.merchants_file is None:
        raise ConfigError(
            f"{MERCHANTS_FILE_VARIABLE}: required by the merchant-events worker (a TOML merchant registry)"
        )
    return load_merchant_registry(settings.merchants_file)


def unbinding_policy_from_settings(settings: Settings) -> UnbindingPolicy:
    """What the ingress answers ``consultUnbinding`` from: the registry's flags, or allow-all without one."""
    if settings.merchants_file is None:
        return ALLOW_EVERY_UNBINDING
    return load_merchant_registry(settings.merchants_file, read_secret_files=False).unbinding_policy()


def generate_secret(size: int = 32) -> str:
    """A fresh Standard Webhooks secret, for ``authnotify dev`` and tests."""
    import secrets

    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(size)).decode("ascii")
