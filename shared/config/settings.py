"""All configuration, read from the environment (and a ``.env`` file) in this one module, validated at start.

Every process builds its settings through :func:`load`; nothing else reads ``os.environ``. A bad value
fails the start with one line naming the variable. The classes form one family over
:class:`EnvironmentSettings`: :class:`Settings` holds the variables of docs/configuration.md,
:class:`DevSettings` and :class:`SimulateSettings` the developer tools' own ``AUTHNOTIFY_DEV_*`` and
``AUTHNOTIFY_SIMULATE_*``.

Secrets (the URLs, which carry passwords, and the RSA keys) are ``SecretStr``: no repr, log line or error
shows them. Key values are read and parsed only when a process asks for them, so a process never refuses to
start over a key it does not use; which settings each process needs, and the check at its start, are in
:mod:`authnotify.config.needs`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from dotenv import dotenv_values
from pydantic import AfterValidator, AliasChoices, BeforeValidator, Field, PrivateAttr, SecretStr, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from authnotify.config.keys import (
    InvalidKeyError,
    PrivateKey,
    PublicKeyRing,
    load_private_key,
    load_public_key_ring,
)
from authnotify.config.values import database_tls_mode, parse_duration, parse_durations
from authnotify.errors import ConfigError

ENV_PREFIX = "AUTHNOTIFY_"
PROVIDERS = ("ams", "aps")
Provider = Literal["ams", "aps"]


# Retry delays when neither AUTHNOTIFY_RETRY_DELAYS_<CONSUMER> nor AUTHNOTIFY_RETRY_DELAYS is set: merchants
# get about 27 hours, like the webhook services they already know; everything else about 2.5 hours.
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (10.0, 60.0, 300.0, 1800.0, 7200.0)
CONSUMER_DEFAULT_RETRY_DELAYS: dict[str, tuple[float, ...]] = {
    "merchant-events": (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0),
}


def _parse_retry_delays(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return tuple(float(v) for v in value)
    return parse_durations(str(value))


def _parse_duration(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    return parse_duration(str(value))


def _key_text(value: Any) -> Any:
    """A key value as given: kept as a secret, parsed only when a process needs it. Already-parsed keys (the
    development tools pass their own) are kept as they are."""
    if value is None or isinstance(value, (PrivateKey, PublicKeyRing, SecretStr)):
        return value
    if isinstance(value, RSAPrivateKey):
        return PrivateKey(value)
    text = str(value)
    return SecretStr(text) if text.strip() else None


def _fernet_key(value: SecretStr | None) -> SecretStr | None:
    if value is None or not value.get_secret_value().strip():
        return None
    try:
        Fernet(value.get_secret_value().strip())
    except (ValueError, TypeError):
        raise ValueError("not a Fernet key (32 url-safe base64-encoded bytes)") from None
    return value


def _url_schemes(*schemes: str) -> Any:
    def check(value: SecretStr) -> SecretStr:
        scheme = value.get_secret_value().partition("://")[0]
        if "://" not in value.get_secret_value() or scheme not in schemes:
            raise ValueError(f"must start with {' or '.join(s + '://' for s in schemes)}")
        return value

    return AfterValidator(check)


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


def _metrics_urls(value: str | None) -> str | None:
    """Each comma-separated entry an http:// or https:// URL with a host; ``cafile`` (a CA file that signed the
    broker's certificate, as in an amqps:// URL) only with https://."""
    if value is None or value.strip().lower() == "none":
        return value
    for position, url in enumerate((part.strip() for part in value.split(",") if part.strip()), start=1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"entry {position} must be http://host:port or https://host:port")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if set(query) - {"cafile"}:
            raise ValueError(f"entry {position}: the only query parameter understood is cafile")
        if "cafile" in query and parts.scheme != "https":
            raise ValueError(f"entry {position}: cafile is for https:// only")
    return value


def _blank_is_unset(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _otel(variable: str) -> Any:
    """A field read from one of OpenTelemetry's own variables (not AUTHNOTIFY_*); blank means unset."""
    return Field(default=None, validation_alias=AliasChoices(variable, variable.lower()))


RetryDelays = Annotated[tuple[float, ...] | None, NoDecode, BeforeValidator(_parse_retry_delays)]
Duration = Annotated[float, NoDecode, BeforeValidator(_parse_duration)]  # seconds; written 10s, 1m, 24h, 7d
KeyValue = Annotated[Any, NoDecode, BeforeValidator(_key_text)]
OptionalText = Annotated[str | None, BeforeValidator(_blank_is_unset)]
OtlpProtocol = Annotated[Literal["grpc", "http/protobuf"] | None, BeforeValidator(_blank_is_unset)]
TokenKeysValue = Annotated[Any, NoDecode, BeforeValidator(_parse_token_keys)]
BrokerUrl = Annotated[SecretStr, _url_schemes("amqp", "amqps")]
# postgresql:// means asyncpg, the one PostgreSQL driver (authnotify.store.engine reads it so).
def _database_tls(value: SecretStr) -> SecretStr:
    database_tls_mode(value.get_secret_value())  # an unknown sslmode stops the start, not the first query
    return value


DatabaseUrl = Annotated[SecretStr, _url_schemes("sqlite+aiosqlite", "postgresql+asyncpg", "postgresql"),
                        AfterValidator(_database_tls)]


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

    rabbitmq_url: BrokerUrl = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    database_url: DatabaseUrl = SecretStr("sqlite+aiosqlite:///authnotify.db")
    namespace: str = Field(default="authnotify", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
    queue_type: Literal["quorum", "classic"] = "quorum"
    http_host: str = Field(default="0.0.0.0", min_length=1)
    http_port: int = Field(default=8080, ge=1, le=65535)
    worker_http_port: int = Field(default=9090, ge=0, le=65535)
    metrics_port: int = Field(default=9091, ge=0, le=65535)  # the ingress's /metrics; 0 turns it off

    ams_client_id: str | None = None
    ams_private_key: KeyValue = None
    ams_alipay_public_key: KeyValue = None
    ams_gateway_url: str = Field(default="https://open-sea-global.alipay.com", pattern=r"^https?://")
    ams_customer_belongs_to: str | None = Field(default=None, max_length=64)

    aps_client_id: str | None = None
    aps_private_key: KeyValue = None
    aps_alipay_public_key: KeyValue = None
    aps_gateway_url: str = Field(default="https://open-sea-global.alipayplus.com", pattern=r"^https?://")

    token_keys: TokenKeysValue = None
    merchants_file: Path | None = None
    # Unset: each consumer's own AUTHNOTIFY_RETRY_DELAYS_<CONSUMER>, else its default (retry_delays_for).
    retry_delays: RetryDelays = None
    # One per consumer (name upper-cased, - as _); a consumer added to the registry adds its line here.
    retry_delays_authcode_created: RetryDelays = None
    retry_delays_token_created: RetryDelays = None
    retry_delays_token_canceled: RetryDelays = None
    retry_delays_merchant_events: RetryDelays = None
    retry_delays_token_refresh: RetryDelays = None
    retry_delays_revocations: RetryDelays = None
    # Consecutive failed deliveries to one merchant after which its events wait on their retry delays without
    # being attempted (workers/merchant_circuit.py); 0 turns the circuit off.
    merchant_circuit_failures: int = Field(default=5, ge=0)
    ingress_max_inflight: int = Field(default=1024, ge=1)
    # `authnotify ingress --processes N` when the flag is not given (Kubernetes sets it per overlay).
    ingress_processes: int = Field(default=1, ge=1)
    request_time_tolerance: Duration = 26 * 3600.0  # Alipay retries for 24 hours
    ingress_body_timeout: Duration = 10.0
    # What a proxy in front of the ingress adds to the notify paths Alipay calls (and signs), e.g. /alipay.
    notify_path_prefix: str = Field(default="", pattern=r"^(/[A-Za-z0-9._~%!$&'()*+,;=:@-]+)*$")
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # The token lifecycle (docs/lifecycle.md): the scheduler's pace and how far ahead it looks.
    scheduler_interval: Duration = 60.0
    refresh_before: Duration = 86400.0
    expiry_warning: Duration = 7 * 86400.0

    # The internal API (docs/api.md): never the ingress's listener.
    api_host: str = Field(default="127.0.0.1", min_length=1)
    api_port: int = Field(default=8088, ge=1, le=65535)
    api_keys_file: Path | None = None
    # The console's session cookies are encrypted with this Fernet key; unset, each api process makes its own
    # (sessions then end when it restarts, and several replicas need it set, the same everywhere).
    console_session_key: Annotated[SecretStr | None, AfterValidator(_fernet_key)] = None
    # RabbitMQ's Prometheus endpoints (rabbitmq_prometheus, one per node, comma-separated), where the API reads
    # each queue's unacknowledged messages; unset: the broker's host on port 15692; "none": not asked.
    # https://...:15691?cafile=/path trusts that CA (a TLS-only broker serves its metrics there).
    rabbitmq_metrics_urls: Annotated[str | None, AfterValidator(_metrics_urls)] = None

    # Tracing (authnotify.observability.tracing), with the otel extra: on when an OTLP endpoint is set. These
    # are OpenTelemetry's standard variables; the SDK itself reads the others (OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER,
    # OTEL_EXPORTER_OTLP_HEADERS, ...).
    otel_exporter_otlp_endpoint: OptionalText = _otel("OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_exporter_otlp_traces_endpoint: OptionalText = _otel("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    otel_exporter_otlp_protocol: OtlpProtocol = _otel("OTEL_EXPORTER_OTLP_PROTOCOL")
    otel_exporter_otlp_traces_protocol: OtlpProtocol = _otel("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")

    _parsed_keys: dict[str, Any] = PrivateAttr(default_factory=dict)

    def tracing_endpoint(self) -> str | None:
        """Where the exporter sends traces, as OpenTelemetry reads its variables: the traces endpoint as given,
        else the general one (with /v1/traces appended over HTTP); None: tracing is off.

        Given to the exporter explicitly, so that the variables work from .env too (the SDK reads only the
        process environment)."""
        if self.otel_exporter_otlp_traces_endpoint:
            return self.otel_exporter_otlp_traces_endpoint
        general = self.otel_exporter_otlp_endpoint
        if not general or self.tracing_protocol() in (None, "grpc"):  # gRPC, the default, takes it as given
            return general
        return general.rstrip("/") + "/v1/traces"

    def tracing_protocol(self) -> str | None:
        return self.otel_exporter_otlp_traces_protocol or self.otel_exporter_otlp_protocol

    def retry_delays_for(self, consumer: str) -> tuple[float, ...]:
        """The consumer's own delays, else AUTHNOTIFY_RETRY_DELAYS, else the consumer's default."""
        own = getattr(self, "retry_delays_" + consumer.replace("-", "_"), None)
        if own is not None:
            return tuple(own)
        if self.retry_delays is not None:
            return tuple(self.retry_delays)
        return CONSUMER_DEFAULT_RETRY_DELAYS.get(consumer, DEFAULT_RETRY_DELAYS)

    def configured_providers(self) -> list[str]:
        """The providers whose client id is set (their endpoints are on); no key is read for this."""
        return [name for name in PROVIDERS if getattr(self, f"{name}_client_id", None)]

    def _key(self, name: str, part: str, parse: Any) -> Any:
        """A provider's key, read and parsed once; ConfigError naming the variable when missing or bad."""
        variable = f"{ENV_PREFIX}{name.upper()}_{part.upper()}"
        cached = self._parsed_keys.get(variable)
        if cached is not None:
            return cached
        value = getattr(self, f"{name}_{part}")
        if value is None:
            raise ConfigError(f"{variable} is required when {ENV_PREFIX}{name.upper()}_CLIENT_ID is set")
        if isinstance(value, SecretStr):
            try:
                value = parse(value.get_secret_value())
            except InvalidKeyError as exc:
                raise ConfigError(f"{variable}: {exc}") from None
        self._parsed_keys[variable] = value
        return value

    def provider(self, name: str) -> ProviderConfig | None:
        """The provider's configuration with its keys read, or None when its client id is not set.

        Raises ConfigError (naming the variable) when a key is missing or unreadable."""
        client_id = getattr(self, f"{name}_client_id", None)
        if not client_id:
            return None
        private_key = self._key(name, "private_key", lambda text: PrivateKey(load_private_key(text)))
        return ProviderConfig(
            name=name,  # type: ignore[arg-type]
            client_id=client_id,
            private_key=private_key.key,
            alipay_public_keys=self._key(name, "alipay_public_key", load_public_key_ring),
            gateway_url=getattr(self, f"{name}_gateway_url").rstrip("/"),
            customer_belongs_to=self.ams_customer_belongs_to if name == "ams" else None,
        )

    def alipay_public_keys(self, name: str) -> PublicKeyRing:
        """The provider's Alipay public key(s) alone (to check a signature, nothing to sign with)."""
        if not getattr(self, f"{name}_client_id", None):
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}_CLIENT_ID: not set, so there is no {name.upper()} "
                              "endpoint to verify for")
        ring: PublicKeyRing = self._key(name, "alipay_public_key", load_public_key_ring)
        return ring

    def providers(self) -> dict[str, ProviderConfig]:
        configured = {name: self.provider(name) for name in self.configured_providers()}
        return {name: cfg for name, cfg in configured.items() if cfg is not None}

    def broker_url(self) -> str:
        """AUTHNOTIFY_RABBITMQ_URL with its password: only for opening the connection."""
        return self.rabbitmq_url.get_secret_value()

    def broker_vhost(self) -> str:
        """The virtual host of AUTHNOTIFY_RABBITMQ_URL ("/" when the URL names none)."""
        path = urlsplit(self.broker_url()).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    def broker_metrics_urls(self) -> tuple[str, ...]:
        """Where RabbitMQ's Prometheus endpoints are (AUTHNOTIFY_RABBITMQ_METRICS_URLS), none when turned off."""
        if self.rabbitmq_metrics_urls is None:
            host = urlsplit(self.broker_url()).hostname or "127.0.0.1"
            return (f"http://[{host}]:15692" if ":" in host else f"http://{host}:15692",)
        if self.rabbitmq_metrics_urls.strip().lower() == "none":
            return ()
        return tuple(url.strip() for url in self.rabbitmq_metrics_urls.split(",") if url.strip())

    def store_url(self) -> str:
        """AUTHNOTIFY_DATABASE_URL with its password: only for opening the database."""
        return self.database_url.get_secret_value()

    def require_token_keys(self) -> TokenKeys:
        if self.token_keys is None:
            raise ConfigError(f"{ENV_PREFIX}TOKEN_KEYS: required wherever tokens are stored")
        return self.token_keys


class DevSettings(EnvironmentSettings):
    """``authnotify dev``'s own: where the simulated gateway and merchant listen, where the dev keys live."""

    dev_gateway_port: int = Field(default=8081, ge=0, le=65535)
    dev_merchant_port: int = Field(default=8082, ge=0, le=65535)
    dev_dir: Path = Path(".authnotify")
    # Lifetimes of the tokens the simulated gateway hands out: short enough to watch a lifecycle.
    dev_access_token_lifetime: Duration = 10.0
    dev_refresh_token_lifetime: Duration = 30.0


class SimulateSettings(EnvironmentSettings):
    """What ``authnotify simulate`` reads; its options override it. Keys stay text until used."""

    ams_client_id: str | None = None
    aps_client_id: str | None = None
    simulate_url: str | None = None
    simulate_alipay_private_key: SecretStr | None = None  # signs the notifications
    simulate_public_key: str | None = None  # ours: verifies the ingress's answers


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = first.get("loc") or ()
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if loc:
        name = str(loc[0]).upper()
        return f"{name if name.startswith('OTEL_') else ENV_PREFIX + name}: {message}"
    return message


# Read by the test suite and its tools, never by a process: not unknown, not settings.
RESERVED_PREFIXES = (f"{ENV_PREFIX}TEST_",)


def known_variables() -> set[str]:
    """Every ``AUTHNOTIFY_*`` name some member of the settings family reads."""
    names: set[str] = set()
    for settings_class in (Settings, DevSettings, SimulateSettings):
        names |= {f"{ENV_PREFIX}{name.upper()}" for name, field in settings_class.model_fields.items()
                  if field.validation_alias is None}
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
