"""Configuration (docs/configuration.md): every bad value is refused with one line naming its variable."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from authnotify.config import Need, Settings, check_needs, load_settings
from authnotify.errors import ConfigError
from authnotify.messaging.topology import CONSUMER_NAMES, build_topology
from tests.conftest import AMS_CLIENT_ID, APS_CLIENT_ID
from tests.conftest import TestKeys as Keys

SECRET_LOOKING = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ"


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No AUTHNOTIFY_* variables and no .env from the developer's machine."""
    for name in list(os.environ):
        if name.startswith("AUTHNOTIFY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


BAD_VALUES: list[tuple[str, str]] = [
    ("AUTHNOTIFY_RABBITMQ_URL", "http://127.0.0.1:5672/"),
    ("AUTHNOTIFY_DATABASE_URL", "mysql://root@localhost/authnotify"),
    ("AUTHNOTIFY_DATABASE_URL", "postgresql://authnotify@db/authnotify?sslmode=maybe"),
    ("AUTHNOTIFY_NAMESPACE", "has spaces!"),
    ("AUTHNOTIFY_NAMESPACE", ""),
    ("AUTHNOTIFY_QUEUE_TYPE", "stream"),
    ("AUTHNOTIFY_HTTP_HOST", ""),
    ("AUTHNOTIFY_HTTP_PORT", "0"),
    ("AUTHNOTIFY_HTTP_PORT", "70000"),
    ("AUTHNOTIFY_HTTP_PORT", "eighty"),
    ("AUTHNOTIFY_WORKER_HTTP_PORT", "-1"),
    ("AUTHNOTIFY_METRICS_PORT", "70000"),
    ("AUTHNOTIFY_AMS_GATEWAY_URL", "ftp://open-sea-global.alipay.com"),
    ("AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO", "W" * 65),
    ("AUTHNOTIFY_APS_GATEWAY_URL", "open-sea-global.alipayplus.com"),
    ("AUTHNOTIFY_TOKEN_KEYS", "not-a-fernet-key"),
    ("AUTHNOTIFY_RETRY_DELAYS", "10s,soon"),
    ("AUTHNOTIFY_RETRY_DELAYS", "0s"),
    ("AUTHNOTIFY_RETRY_DELAYS_MERCHANT_EVENTS", "5s,later"),
    ("AUTHNOTIFY_REQUEST_TIME_TOLERANCE", "a day"),
    ("AUTHNOTIFY_INGRESS_BODY_TIMEOUT", "0s"),
    ("AUTHNOTIFY_INGRESS_MAX_INFLIGHT", "0"),
    ("AUTHNOTIFY_INGRESS_MAX_INFLIGHT", "many"),
    ("AUTHNOTIFY_LOG_FORMAT", "xml"),
    ("AUTHNOTIFY_RABBITMQ_METRICS_URLS", "ftp://node:15692"),
    ("AUTHNOTIFY_RABBITMQ_METRICS_URLS", "http://a:15692,node-2:15692"),  # entry 2 has no scheme
    ("AUTHNOTIFY_RABBITMQ_METRICS_URLS", "http://node:15692?cafile=/ca.crt"),  # cafile with https only
    ("AUTHNOTIFY_RABBITMQ_METRICS_URLS", "https://node:15691?ca=/ca.crt"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES, ids=[f"{v}={x[:20]}" for v, x in BAD_VALUES])
def test_a_bad_value_is_refused_naming_its_variable(environment: pytest.MonkeyPatch, variable: str,
                                                     value: str) -> None:
    environment.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith(f"{variable}:"), message
    assert "\n" not in message
    assert SECRET_LOOKING not in message


def test_a_second_fernet_key_that_is_bad_is_named_by_position(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("AUTHNOTIFY_TOKEN_KEYS", f"{Fernet.generate_key().decode()},broken")
    with pytest.raises(ConfigError, match=r"^AUTHNOTIFY_TOKEN_KEYS: key 2 is not a Fernet key"):
        load_settings()


BAD_KEYS: list[tuple[str, str]] = [
    ("AUTHNOTIFY_AMS_PRIVATE_KEY", SECRET_LOOKING),
    ("AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY", SECRET_LOOKING),
    ("AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY", '{"1": "not a key"}'),
    ("AUTHNOTIFY_APS_PRIVATE_KEY", "@/nonexistent/key.pem"),
    ("AUTHNOTIFY_APS_ALIPAY_PUBLIC_KEY", "not base64 %%%"),
]


def _provider_environment(environment: pytest.MonkeyPatch, keys: Keys) -> None:
    for provider, client_id in (("AMS", AMS_CLIENT_ID), ("APS", APS_CLIENT_ID)):
        environment.setenv(f"AUTHNOTIFY_{provider}_CLIENT_ID", client_id)
        environment.setenv(f"AUTHNOTIFY_{provider}_PRIVATE_KEY", keys.ours.private_pem)
        environment.setenv(f"AUTHNOTIFY_{provider}_ALIPAY_PUBLIC_KEY", keys.alipay.public_pem)


@pytest.mark.parametrize(("variable", "value"), BAD_KEYS, ids=[f"{v}={x[:20]}" for v, x in BAD_KEYS])
def test_a_bad_key_is_refused_naming_its_variable_by_the_processes_that_use_it(
        environment: pytest.MonkeyPatch, keys: Keys, variable: str, value: str) -> None:
    _provider_environment(environment, keys)
    environment.setenv(variable, value)
    settings = load_settings()  # keys are read by the processes that need them, not by every process
    check_needs(settings, {Need.BROKER})  # a process that needs no keys starts all the same
    with pytest.raises(ConfigError) as error:
        check_needs(settings, {Need.ALIPAY_KEYS})
    message = str(error.value)
    assert message.startswith(f"{variable}:"), message
    assert "\n" not in message and SECRET_LOOKING not in message


@pytest.mark.parametrize("missing", ["PRIVATE_KEY", "ALIPAY_PUBLIC_KEY"])
def test_a_client_id_without_its_keys_names_the_missing_key(environment: pytest.MonkeyPatch, keys: Keys,
                                                           missing: str) -> None:
    environment.setenv("AUTHNOTIFY_APS_CLIENT_ID", "2188120123456789")
    present = {"PRIVATE_KEY": keys.ours.private_pem, "ALIPAY_PUBLIC_KEY": keys.alipay.public_pem}
    for part, value in present.items():
        if part != missing:
            environment.setenv(f"AUTHNOTIFY_APS_{part}", value)
    settings = load_settings()
    with pytest.raises(ConfigError, match=f"^AUTHNOTIFY_APS_{missing} is required when AUTHNOTIFY_APS_CLIENT_ID"):
        check_needs(settings, {Need.ALIPAY_KEYS})


def test_each_process_demands_only_what_it_uses(environment: pytest.MonkeyPatch) -> None:
    """Issue 6: the merchant deliverer's pod had our RSA keys because a client id demanded them everywhere."""
    from authnotify.api.server import API_NEEDS
    from authnotify.cli.main import COMMAND_NEEDS, build_parser, command_needs
    from authnotify.ingress.server import INGRESS_NEEDS
    from authnotify.scheduler.process import SCHEDULER_NEEDS
    from authnotify.workers.registry import needs_of

    # Client ids set (a shared ConfigMap sets them for every pod), key files not mounted, no token keys.
    environment.setenv("AUTHNOTIFY_AMS_CLIENT_ID", AMS_CLIENT_ID)
    environment.setenv("AUTHNOTIFY_AMS_PRIVATE_KEY", "@/run/secrets/not-mounted/ams-private-key")
    environment.setenv("AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY", "@/run/secrets/not-mounted/ams-alipay-public-key")
    environment.setenv("AUTHNOTIFY_MERCHANTS_FILE", "/run/secrets/merchants.toml")
    settings = load_settings()
    check_needs(settings, needs_of(["merchant-events"]))
    for command in ("topology", "dlq", "migrate", "authorizations", "authorizations revoke"):
        check_needs(settings, COMMAND_NEEDS[command])
    check_needs(settings, SCHEDULER_NEEDS)  # publishes commands and warnings: never a key of any kind

    with pytest.raises(ConfigError, match="^AUTHNOTIFY_AMS_PRIVATE_KEY: cannot read key file"):
        check_needs(settings, INGRESS_NEEDS)
    for worker in ("token-created", "token-refresh", "revocations"):
        with pytest.raises(ConfigError, match="^AUTHNOTIFY_TOKEN_KEYS"):
            check_needs(settings, needs_of([worker]))
    with pytest.raises(ConfigError, match="^AUTHNOTIFY_TOKEN_KEYS"):
        check_needs(settings, COMMAND_NEEDS["reencrypt-tokens"])
    with pytest.raises(ConfigError, match="^AUTHNOTIFY_TOKEN_KEYS"):
        check_needs(settings, API_NEEDS)

    # With token keys: the api wants its keys file, never the RSA keys (on-demand refreshes are queued for
    # token-refresh); token-refresh and revocations call Alipay, so they want the RSA keys.
    environment.setenv("AUTHNOTIFY_TOKEN_KEYS", Fernet.generate_key().decode())
    settings = load_settings()
    with pytest.raises(ConfigError, match="^AUTHNOTIFY_API_KEYS_FILE: required by the api"):
        check_needs(settings, API_NEEDS)
    environment.setenv("AUTHNOTIFY_API_KEYS_FILE", "/run/secrets/api-keys.toml")
    check_needs(load_settings(), API_NEEDS)
    for worker in ("token-refresh", "revocations"):
        with pytest.raises(ConfigError, match="^AUTHNOTIFY_AMS_PRIVATE_KEY: cannot read key file"):
            check_needs(settings, needs_of([worker]))

    assert needs_of(["merchant-events"]) == {Need.BROKER, Need.MERCHANTS_FILE}
    assert Need.DATABASE not in INGRESS_NEEDS and Need.TOKEN_KEYS not in INGRESS_NEEDS
    assert SCHEDULER_NEEDS == {Need.BROKER, Need.DATABASE}
    assert API_NEEDS == {Need.BROKER, Need.DATABASE, Need.TOKEN_KEYS, Need.API_KEYS_FILE}
    for worker in ("token-refresh", "revocations"):
        assert needs_of([worker]) == {Need.BROKER, Need.DATABASE, Need.TOKEN_KEYS, Need.ALIPAY_KEYS,
                                      Need.AMS_CUSTOMER_BELONGS_TO}, worker
    # A subcommand with needs of its own: revoke publishes; list and show only read the database.
    parser = build_parser()
    assert command_needs(parser.parse_args(["authorizations", "revoke", "auth_x"])) == {Need.DATABASE, Need.BROKER}
    assert command_needs(parser.parse_args(["authorizations", "list"])) == {Need.DATABASE}


def test_the_ingress_needs_a_provider_and_authcode_created_needs_customer_belongs_to(
        environment: pytest.MonkeyPatch, keys: Keys) -> None:
    from authnotify.ingress.server import INGRESS_NEEDS
    from authnotify.workers.registry import needs_of

    with pytest.raises(ConfigError, match="no provider configured"):
        check_needs(load_settings(), INGRESS_NEEDS)
    _provider_environment(environment, keys)
    environment.setenv("AUTHNOTIFY_TOKEN_KEYS", Fernet.generate_key().decode())
    settings = load_settings()
    check_needs(settings, INGRESS_NEEDS)
    with pytest.raises(ConfigError, match="^AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO is required"):
        check_needs(settings, needs_of(["authcode-created"]))
    environment.setenv("AUTHNOTIFY_AMS_CUSTOMER_BELONGS_TO", "ALIPAY_CN")
    check_needs(load_settings(), needs_of(["authcode-created"]))


def test_retry_delays_per_consumer_then_the_shared_variable_then_each_default(environment: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.retry_delays_for("merchant-events") == (5, 300, 1800, 7200, 18000, 36000, 36000)
    for name in ("authcode-created", "token-created", "token-canceled", "token-refresh", "revocations"):
        assert settings.retry_delays_for(name) == (10, 60, 300, 1800, 7200)

    environment.setenv("AUTHNOTIFY_RETRY_DELAYS", "1s,2s")
    environment.setenv("AUTHNOTIFY_RETRY_DELAYS_TOKEN_CANCELED", "3s")
    settings = load_settings()
    assert settings.retry_delays_for("merchant-events") == (1, 2)
    assert settings.retry_delays_for("token-created") == (1, 2)
    assert settings.retry_delays_for("token-canceled") == (3,)
    topology = build_topology(settings)
    assert [step.queue.rsplit(".", 1)[1] for step in topology.retry_steps("token-canceled")] == ["3s"]
    assert topology.max_attempts("token-canceled") == 2 and topology.max_attempts("merchant-events") == 3

    # The lifecycle consumers have their own variables too, and their own retry queues.
    environment.setenv("AUTHNOTIFY_RETRY_DELAYS_TOKEN_REFRESH", "30s,5m")
    environment.setenv("AUTHNOTIFY_RETRY_DELAYS_REVOCATIONS", "4s")
    settings = load_settings()
    assert settings.retry_delays_for("token-refresh") == (30, 300)
    assert settings.retry_delays_for("revocations") == (4,)
    topology = build_topology(settings)
    assert [step.queue for step in topology.retry_steps("token-refresh")] == [
        "authnotify.token-refresh.retry.30s", "authnotify.token-refresh.retry.5m"]
    assert [step.queue for step in topology.retry_steps("revocations")] == ["authnotify.revocations.retry.4s"]
    assert topology.max_attempts("token-refresh") == 3 and topology.max_attempts("revocations") == 2
    declared = topology.all_queue_names()
    assert "authnotify.token-refresh.retry.5m" in declared and "authnotify.revocations.retry.4s" in declared
    assert "authnotify.revocations.retry.1s" not in declared  # the shared delays are not theirs


def test_every_consumer_has_its_own_retry_delays_variable() -> None:
    for name in CONSUMER_NAMES:
        assert f"retry_delays_{name.replace('-', '_')}" in Settings.model_fields, name


def test_passwords_and_keys_never_show_in_a_settings_repr(environment: pytest.MonkeyPatch, keys: Keys) -> None:
    """Issue 6: the repr of the settings showed the broker and database passwords."""
    _provider_environment(environment, keys)
    token_key = Fernet.generate_key().decode()
    environment.setenv("AUTHNOTIFY_RABBITMQ_URL", "amqps://authnotify:BrokerPassw0rd@rabbit:5671/")
    environment.setenv("AUTHNOTIFY_DATABASE_URL", "postgresql://authnotify:DatabasePassw0rd@db:5432/a?sslmode=require")
    environment.setenv("AUTHNOTIFY_TOKEN_KEYS", token_key)
    settings = load_settings()
    check_needs(settings, {Need.ALIPAY_KEYS})
    shown = " ".join([repr(settings), str(settings), repr(settings.providers()), repr(settings.model_dump())])
    body = "".join(keys.ours.private_pem.splitlines()[1:-1])
    for secret in ("BrokerPassw0rd", "DatabasePassw0rd", token_key, body[20:60], "PRIVATE KEY"):
        assert secret not in shown
    assert settings.broker_url() == "amqps://authnotify:BrokerPassw0rd@rabbit:5671/"
    assert settings.store_url().startswith("postgresql://")  # a plain postgresql:// URL is accepted


def test_defaults_are_the_documented_defaults(environment: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.broker_url() == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.store_url() == "sqlite+aiosqlite:///authnotify.db"
    assert (settings.namespace, settings.queue_type) == ("authnotify", "quorum")
    assert (settings.http_host, settings.http_port, settings.worker_http_port) == ("0.0.0.0", 8080, 9090)
    assert settings.metrics_port == 9091
    assert settings.retry_delays is None  # each consumer's default (see the retry delays test)
    assert settings.retry_delays_for("token-created") == (10.0, 60.0, 300.0, 1800.0, 7200.0)
    assert settings.request_time_tolerance == 26 * 3600 and settings.ingress_body_timeout == 10
    assert settings.ingress_max_inflight == 1024
    assert settings.log_format == "json"
    assert settings.providers() == {}  # both endpoints off until a client id is set


def test_dot_env_is_read_and_the_environment_wins(environment: pytest.MonkeyPatch, tmp_path: Path,
                                                 keys: Keys) -> None:
    key_file = tmp_path / "alipay.pem"
    key_file.write_text(keys.alipay.public_pem)
    private_b64 = "".join(keys.ours.private_pem.splitlines()[1:-1])  # bare base64 PKCS#8, as portals give it
    (tmp_path / ".env").write_text(
        "AUTHNOTIFY_NAMESPACE=from-dotenv\n"
        "AUTHNOTIFY_RETRY_DELAYS=200ms,1m\n"
        "AUTHNOTIFY_QUEUE_TYPE=classic\n"
        f"AUTHNOTIFY_AMS_CLIENT_ID={AMS_CLIENT_ID}\n"
        f"AUTHNOTIFY_AMS_PRIVATE_KEY={private_b64}\n"
        f"AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY=@{key_file}\n"
    )
    environment.setenv("AUTHNOTIFY_QUEUE_TYPE", "quorum")
    settings = load_settings()
    check_needs(settings, {Need.ALIPAY_KEYS})
    assert settings.namespace == "from-dotenv"
    assert settings.retry_delays == (0.2, 60.0)
    assert settings.queue_type == "quorum"
    ams = settings.provider("ams")
    assert ams is not None and ams.client_id == AMS_CLIENT_ID
    assert ams.alipay_public_keys.for_version("1") is not None
    assert settings.provider("aps") is None


def test_secrets_do_not_show_in_the_settings_repr(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(token_keys=Fernet.generate_key().decode())
    text = repr(settings) + repr(settings.provider("ams"))
    assert "PRIVATE KEY" not in text and "BEGIN" not in text
    assert settings.token_keys is not None and "redacted" in repr(settings.token_keys)


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authnotify", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def _clean_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("AUTHNOTIFY_")}


@pytest.mark.parametrize(("command", "variable", "value"), [
    ("topology", "AUTHNOTIFY_QUEUE_TYPE", "stream"),
    ("ingress", "AUTHNOTIFY_AMS_PRIVATE_KEY", SECRET_LOOKING),
    ("topology", "AUTHNOTIFY_RETRY_DELAYS", "soon"),
])
@pytest.mark.slow
def test_the_cli_prints_one_line_naming_the_variable_and_fails(tmp_path: Path, command: str, variable: str,
                                                               value: str) -> None:
    env = {**_clean_env(), variable: value, "AUTHNOTIFY_AMS_CLIENT_ID": AMS_CLIENT_ID,
           "AUTHNOTIFY_AMS_ALIPAY_PUBLIC_KEY": SECRET_LOOKING}
    result = _cli([command], env, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert SECRET_LOOKING not in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_the_cli_reads_a_bad_value_from_dot_env_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("AUTHNOTIFY_HTTP_PORT=99999\n")
    result = _cli(["topology"], _clean_env(), tmp_path)
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1 and "AUTHNOTIFY_HTTP_PORT" in result.stderr


@pytest.mark.slow
def test_the_cli_declares_the_topology_with_good_settings(make_settings: Callable[..., Settings],
                                                          rabbitmq_url: str, tmp_path: Path) -> None:
    settings = make_settings()  # registers the namespace for deletion after the test
    env = {**_clean_env(), "AUTHNOTIFY_RABBITMQ_URL": rabbitmq_url, "AUTHNOTIFY_NAMESPACE": settings.namespace,
           "AUTHNOTIFY_RETRY_DELAYS": "1s,2s"}
    result = _cli(["topology"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"in namespace {settings.namespace}" in result.stdout


@pytest.mark.slow
def test_the_cli_names_an_unreachable_broker_in_one_line(tmp_path: Path) -> None:
    env = {**_clean_env(), "AUTHNOTIFY_RABBITMQ_URL": "amqp://guest:secretpw@127.0.0.1:1/"}
    result = _cli(["topology"], env, tmp_path)
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "broker unreachable" in result.stderr and "secretpw" not in result.stderr
