"""All configuration, read from the environment (and a ``.env`` file) in this one module, validated at start.

Every process builds its settings through :func:`load`; nothing else reads ``os.environ``. A bad value
fails the start with one line naming the variable. The classes form one family over
:class:`EnvironmentSettings`: :class:`Settings` holds the variables of docs/configuration.md,
:class:`DevSettings` and :class:`SimulateSettings` the developer tools' own ``AUTHNOTIFY_DEV_*`` and
``AUTHNOTIFY_SIMULATE_*``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from dotenv import dotenv_values
from pydantic import BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from authnotify.config.keys import (
    InvalidKeyError,
    PrivateKey,
    PublicKeyRing,
    load_private_key,
    load_public_key_ring,
)
from authnotify.config.values import parse_durations
from authnotify.errors import ConfigError

ENV_PREFIX = "AUTHNOTIFY_"
PROVIDERS = ("ams", "aps")
Provider = Literal["ams", "aps"]


def _parse_retry_delays(value: Any) -> tuple[float, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(float(v) for v in value)
    return parse_durations(str(value))


def _parse_private_key(value: Any) -> PrivateKey | None:
    if value is None or isinstance(value, PrivateKey):
        return value
    if isinstance(value, RSAPrivateKey):
        return PrivateKey(value)
    if not str(value).strip():
        return None
    try:
        return PrivateKey(load_private_key(str(value)))
    except InvalidKeyError as exc:
        raise ValueError(str(exc)) from None


def _parse_public_keys(value: Any) -> PublicKeyRing | None:
    if value is None or isinstance(value, PublicKeyRing):
        return value
    if not str(value).strip():
        return None
    try:
        return load_public_key_ring(str(value))
    except InvalidKeyError as exc:
        raise ValueError(str(exc)) from None


class TokenKeys:
    """The Fernet keys of AUTHNOTIFY_TOKEN_KEYS, checked: the first encrypts, all decrypt (the store's
    encryption module uses them)."""

    __slots__ = ("keys",)

    def __init__(self, keys: list[str]) -> None:
        self.keys = tuple(keys)

    def __repr__(self) -> str:
        return f"TokenKeys(<{len(self.keys)} redacted>)"


def _parse_token_keys(value: Any) -> TokenKeys | None:
    if value is None or isinstance(value, TokenKeys):
        return value
    keys = [part.strip() for part in str(value).split(",") if part.strip()]
    if not keys:
        return None
    for index, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise ValueError(
                f"key {index} is not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from None
    return TokenKeys(keys)


RetryDelays = Annotated[tuple[float, ...], NoDecode, BeforeValidator(_parse_retry_delays)]
PrivateKeyValue = Annotated[Any, NoDecode, BeforeValidator(_parse_private_key)]
PublicKeysValue = Annotated[Any, NoDecode, BeforeValidator(_parse_public_keys)]
TokenKeysValue = Annotated[Any, NoDecode, BeforeValidator(_parse_token_keys)]


@dataclass(frozen=True)
class ProviderConfig:
    """One provider's side of the relationship with Alipay, present only when its client id is set."""

    name: Provider
    client_id: str
    private_key: RSAPrivateKey
    alipay_public_keys: PublicKeyRing
    gateway_url: str
    customer_belongs_to: str | None

    def __repr__(self) -> str:
        return f"ProviderConfig(name={self.name!r}, client_id={self.client_id!r}, gateway_url={self.gateway_url!r})"


class EnvironmentSettings(BaseSettings):
    """Reads ``AUTHNOTIFY_<FIELD>`` from the environment, then from ``.env``; the environment wins."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        frozen=True,
    )


class Settings(EnvironmentSettings):
    """The configuration the services and the operator commands run with (docs/configuration.md)."""

    rabbitmq_url: str = Field(default="amqp://guest:guest@127.0.0.1:5672/", pattern=r"^amqps?://")
    database_url: str = Field(
        default="sqlite+aiosqlite:///authnotify.db",
        pattern=r"^(sqlite\+aiosqlite|postgresql\+asyncpg)://",
    )
    namespace: str = Field(default="authnotify", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
    queue_type: Literal["quorum", "classic"] = "quorum"
    http_host: str = Field(default="0.0.0.0", min_length=1)
    http_port: int = Field(default=8080, ge=1, le=65535)
    worker_http_port: int = Field(default=9090, ge=0, le=65535)

    ams_client_id: str | None = None
    ams_private_key: PrivateKeyValue = None
    ams_alipay_public_key: PublicKeysValue = None
    ams_gateway_url: str = Field(default="https://open-sea-global.alipay.com", pattern=r"^https?://")
    ams_customer_belongs_to: str | None = Field(default=None, max_length=64)

    aps_client_id: str | None = None
    aps_private_key: PrivateKeyValue = None
    aps_alipay_public_key: PublicKeysValue = None
    aps_gateway_url: str = Field(default="https://open-sea-global.alipayplus.com", pattern=r"^https?://")

    token_keys: TokenKeysValue = None
    merchants_file: Path | None = None
    retry_delays: RetryDelays = (10.0, 60.0, 300.0, 1800.0, 7200.0)
    ingress_max_inflight: int = Field(default=1024, ge=1)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _provider_keys_complete(self) -> Settings:
        for name in PROVIDERS:
            client_id = getattr(self, f"{name}_client_id")
            if not client_id:
                continue
            for part in ("private_key", "alipay_public_key"):
                if getattr(self, f"{name}_{part}") is None:
                    raise ValueError(
                        f"{ENV_PREFIX}{name.upper()}_{part.upper()} is required when "
                        f"{ENV_PREFIX}{name.upper()}_CLIENT_ID is set"
                    )
        return self

    def provider(self, name: str) -> ProviderConfig | None:
        client_id = getattr(self, f"{name}_client_id", None)
        if not client_id:
            return None
        return ProviderConfig(
            name=name,  # type: ignore[arg-type]
            client_id=client_id,
            private_key=getattr(self, f"{name}_private_key").key,
            alipay_public_keys=getattr(self, f"{name}_alipay_public_key"),
            gateway_url=getattr(self, f"{name}_gateway_url").rstrip("/"),
            customer_belongs_to=self.ams_customer_belongs_to if name == "ams" else None,
        )

    def providers(self) -> dict[str, ProviderConfig]:
        configured = {name: self.provider(name) for name in PROVIDERS}
        return {name: cfg for name, cfg in configured.items() if cfg is not None}

    def require_token_keys(self) -> TokenKeys:
        if self.token_keys is None:
            raise ConfigError(f"{ENV_PREFIX}TOKEN_KEYS: required wherever tokens are stored")
        return self.token_keys


class DevSettings(EnvironmentSettings):
    """``authnotify dev``'s own: where the simulated gateway and merchant listen, where the dev keys live."""

    dev_gateway_port: int = Field(default=8081, ge=0, le=65535)
    dev_merchant_port: int = Field(default=8082, ge=0, le=65535)
    dev_dir: Path = Path(".authnotify")


class SimulateSettings(EnvironmentSettings):
    """What ``authnotify simulate`` reads; its options override it. Keys stay text until used."""

    ams_client_id: str | None = None
    aps_client_id: str | None = None
    simulate_url: str | None = None
    simulate_alipay_private_key: str | None = None  # signs the notifications
    simulate_public_key: str | None = None  # ours: verifies the ingress's answers


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = first.get("loc") or ()
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if loc:
        return f"{ENV_PREFIX}{str(loc[0]).upper()}: {message}"
    return message


# Read by the test suite and its tools, never by a process: not unknown, not settings.
RESERVED_PREFIXES = (f"{ENV_PREFIX}TEST_",)


def known_variables() -> set[str]:
    """Every ``AUTHNOTIFY_*`` name some member of the settings family reads."""
    names: set[str] = set()
    for settings_class in (Settings, DevSettings, SimulateSettings):
        names |= {f"{ENV_PREFIX}{field.upper()}" for field in settings_class.model_fields}
    return names


def unknown_variables(environ: Mapping[str, str], dotenv_path: Path = Path(".env")) -> list[tuple[str, str | None]]:
    """The ``AUTHNOTIFY_*`` names in the environment or ``.env`` that no setting reads (a misspelling runs on
    defaults silently otherwise), each with the closest known name, if one is close."""
    names = {name for name in environ if name.startswith(ENV_PREFIX)}
    if dotenv_path.is_file():
        names |= {name for name in dotenv_values(dotenv_path) if name.startswith(ENV_PREFIX)}
    known = known_variables()
    unknown = sorted(name for name in names - known if not name.startswith(RESERVED_PREFIXES))
    return [(name, next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.8)), None)) for name in unknown]


AnySettings = TypeVar("AnySettings", bound=EnvironmentSettings)


def load(settings_class: type[AnySettings], **overrides: Any) -> AnySettings:
    """Reads and validates one settings class; raises :class:`ConfigError` with a one-line message."""
    try:
        return settings_class(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_settings(**overrides: Any) -> Settings:
    return load(Settings, **overrides)
