"""``authnotify dev``: the whole pipeline in one process, offline, on local defaults.

It reads the normal configuration (environment and ``.env``) and fills in what is not set: development
keys and client ids (``.authnotify/``, created on the first run), a simulated Alipay gateway answering
``applyToken``, ``revoke`` and ``cancelToken`` and a merchant endpoint that prints every event, both served
on localhost, the SQLite file, console logs, and a token lifecycle fast enough to watch: the gateway's
tokens live seconds, the scheduler passes every second and refreshes, warns and expires on that scale.
Then it runs the ingress, every consumer, the scheduler and the internal API (with a development key in
``.authnotify/api-key``) until Ctrl-C or SIGTERM, and stops them in the order that loses nothing: the
ingress and the API first (they answer what is in flight), then the scheduler, then the workers (they
finish what they hold, merchant deliveries included), then the simulated outside world.

Dev-only settings (environment or ``.env``): ``AUTHNOTIFY_DEV_GATEWAY_PORT`` (default 8081) and
``AUTHNOTIFY_DEV_MERCHANT_PORT`` (default 8082) for the simulated gateway and merchant endpoint (0: any free
port), ``AUTHNOTIFY_DEV_DIR`` (default ``.authnotify``) for the keys, ``AUTHNOTIFY_DEV_ACCESS_TOKEN_LIFETIME``
(default 10s) and ``AUTHNOTIFY_DEV_REFRESH_TOKEN_LIFETIME`` (default 30s) for the gateway's tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from authnotify.alipay.notifications import NOTIFY_PATHS
from authnotify.api.app import create_api_app
from authnotify.api.keys import load_api_keys
from authnotify.api.server import console_session_key, operator_queues
from authnotify.config import ENV_PREFIX, PROVIDERS, DevSettings, Settings, load, load_settings
from authnotify.config.keys import ANY_KEY_VERSION, PublicKeyRing
from authnotify.devtools.devkeys import (
    ALIPAY_PRIVATE_KEY,
    ALIPAY_PUBLIC_KEY,
    API_KEY,
    DEV_AMS_CLIENT_ID,
    DEV_APS_CLIENT_ID,
    DEV_CUSTOMER_BELONGS_TO,
    MERCHANTS_FILE,
    OUR_PRIVATE_KEY,
    OUR_PUBLIC_KEY,
    DevKeys,
    ensure_dev_keys,
    write_api_keys_file,
    write_dev_description,
    write_merchants_file,
)
from authnotify.devtools.sandbox.alipay_gateway import AlipayGateway, start_alipay_gateway
from authnotify.devtools.sandbox.merchant_endpoint import MerchantEndpoint
from authnotify.errors import EXIT_OK, EXIT_USAGE, CommandError
from authnotify.ingress.app import create_app
from authnotify.ingress.server import DRAIN_TIMEOUT_SECONDS, LISTEN_BACKLOG
from authnotify.ingress.server import ingress_runner as ingress_runner_for
from authnotify.messaging.connection import BrokerUnreachable, connect_once
from authnotify.messaging.health import HealthServer
from authnotify.messaging.lifecycle import Lifecycle
from authnotify.messaging.topology import CONSUMER_NAMES, build_topology
from authnotify.observability.logging import configure_logging, get_logger
from authnotify.observability.redaction import mask_url
from authnotify.observability.tracing import configure_tracing
from authnotify.scheduler.process import SchedulerLoop
from authnotify.workers.process import Workers
from authnotify.workers.registry import build_specs
from authnotify.workers.resources import Resources

LOCALHOST = "127.0.0.1"
MERCHANT_PATH = "/webhooks/alipay-authorization"
MERCHANT_EVENTS_PATH = "/_dev/events"  # what simulate watches; outside the webhook path on purpose
BROKER_CHECK_TIMEOUT_SECONDS = 5.0
READY_TIMEOUT_SECONDS = 30.0
READY_LINE = "authnotify dev is ready"
DEV_PROVIDER_CLIENT_IDS = {"ams": DEV_AMS_CLIENT_ID, "aps": DEV_APS_CLIENT_ID}
# The lifecycle on the scale of the dev gateway's tokens (seconds): a pass a second, a refresh 4 s ahead of
# an access token's expiry, a warning 20 s ahead of a refresh token's.
DEV_SCHEDULER_INTERVAL = "1s"
DEV_REFRESH_BEFORE = "4s"
DEV_EXPIRY_WARNING = "20s"


async def check_broker(settings: Settings) -> None:
    """One plain connection attempt, so a missing broker is one clear line instead of endless retries."""
    try:
        connection = await connect_once(settings.broker_url(), timeout=BROKER_CHECK_TIMEOUT_SECONDS)
    except BrokerUnreachable as exc:
        raise CommandError(
            f"authnotify dev: no RabbitMQ at {exc.url} ({exc.reason}): start one with "
            "`bash scripts/ensure-rabbitmq.sh` (or `make dev`, which runs it), or point "
            "AUTHNOTIFY_RABBITMQ_URL at one"
        ) from None
    await connection.close()


def dev_configuration(base: Settings, keys: DevKeys, gateway_url: str, merchants_file: Path,
                      api_keys_file: Path | None = None) -> tuple[Settings, dict[str, str], list[str]]:
    """The settings dev runs with: ``base`` plus local defaults for everything not configured.

    Also returns the AUTHNOTIFY_* lines for ``dev.env`` (only what dev filled in) and the providers that
    run on the development keys.
    """
    explicit = base.model_fields_set
    overrides: dict[str, Any] = {}
    environment: dict[str, str] = {}
    dev_providers: list[str] = []

    def fill(name: str, value: Any, env_value: str | None = None) -> None:
        if name not in explicit:
            overrides[name] = value
            environment[f"{ENV_PREFIX}{name.upper()}"] = env_value if env_value is not None else str(value)

    fill("http_host", LOCALHOST)
    fill("log_format", "console")
    fill("scheduler_interval", DEV_SCHEDULER_INTERVAL)
    fill("refresh_before", DEV_REFRESH_BEFORE)
    fill("expiry_warning", DEV_EXPIRY_WARNING)
    if base.api_keys_file is None and api_keys_file is not None:
        fill("api_keys_file", str(api_keys_file))
    alipay_ring = PublicKeyRing({ANY_KEY_VERSION: keys.alipay_public_key})
    for provider in PROVIDERS:
        if f"{provider}_client_id" in explicit:
            continue  # the developer's own provider configuration is left as it is
        dev_providers.append(provider)
        fill(f"{provider}_client_id", DEV_PROVIDER_CLIENT_IDS[provider])
        fill(f"{provider}_private_key", keys.our_private_key, f"@{keys.path(OUR_PRIVATE_KEY)}")
        fill(f"{provider}_alipay_public_key", alipay_ring, f"@{keys.path(ALIPAY_PUBLIC_KEY)}")
        fill(f"{provider}_gateway_url", gateway_url)
        if provider == "ams":
            fill("ams_customer_belongs_to", DEV_CUSTOMER_BELONGS_TO)
    if base.token_keys is None:
        fill("token_keys", keys.token_key)
    if base.merchants_file is None:
        fill("merchants_file", str(merchants_file))
    environment[f"{ENV_PREFIX}SIMULATE_ALIPAY_PRIVATE_KEY"] = f"@{keys.path(ALIPAY_PRIVATE_KEY)}"
    environment[f"{ENV_PREFIX}SIMULATE_PUBLIC_KEY"] = f"@{keys.path(OUR_PUBLIC_KEY)}"
    values = {name: getattr(base, name) for name in explicit}
    values.update(overrides)
    return load_settings(**values), environment, dev_providers


async def _serve(app: web.Application, host: str, port: int, what: str, variable: str | None) -> tuple[
        web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        hint = f": set {variable} to a free port" if variable else ""
        raise CommandError(f"authnotify dev: cannot listen on {host}:{port} for the {what} "
                           f"({exc.strerror or exc}){hint}") from None
    return runner, runner.addresses[0][1]


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it: what a person would type."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _simulate_command() -> str:
    """How the developer calls us: ``.venv/bin/authnotify`` after ``make dev``, else the module."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if program is not None and program.name == "authnotify":
        located = _relative(program.absolute())
        return f"{located if '/' in located else 'authnotify'} simulate lifecycle"
    return f"{_relative(Path(sys.executable).absolute())} -m authnotify simulate lifecycle"


def run_banner(settings: Settings, keys: DevKeys, ingress_url: str, gateway_url: str, merchant_url: str,
               dev_providers: list[str], metrics_url: str, api_url: str) -> str:
    lines = [
        f"authnotify dev: ingress, {len(CONSUMER_NAMES)} consumers, the scheduler and the API in one process "
        f"(namespace {settings.namespace}, {settings.queue_type} queues, {mask_url(settings.store_url())})",
        f"  development keys   {keys.directory} "
        + (f"(created: {', '.join(keys.created)})" if keys.created else "(reused)"),
    ]
    for provider in PROVIDERS:
        config = settings.provider(provider)
        label = "AMS notifications " if provider == "ams" else "APS notifications "
        if config is None:
            lines.append(f"  {label} off (no client id)")
            continue
        origin = "dev keys" if provider in dev_providers else "your configuration"
        lines.append(f"  {label} POST {ingress_url}{NOTIFY_PATHS[provider]}  Client-Id {config.client_id} "
                     f"({origin}; applyToken at {config.gateway_url})")
    lines += [
        f"  Alipay gateway     {gateway_url}  (simulated applyToken, revoke and cancelToken, signed answers)",
        f"  merchant endpoint  {merchant_url}  (prints each event it receives, below)"
        + ("" if settings.merchants_file == keys.path(MERCHANTS_FILE)
           else f"\n                     events go where {settings.merchants_file} says (AUTHNOTIFY_MERCHANTS_FILE)"),
        f"  internal API       {api_url}/v1/authorizations  (Authorization: Bearer $(cat {_relative(keys.path(API_KEY))}))",
        f"  console            {api_url}/  (sign in with the key in {_relative(keys.path(API_KEY))})",
        f"  lifecycle          scheduler every {settings.scheduler_interval:g}s, refresh {settings.refresh_before:g}s "
        f"ahead, expiry warning {settings.expiry_warning:g}s ahead",
        f"  metrics            {metrics_url}   health {ingress_url}/healthz, {ingress_url}/readyz",
        f"  database           {mask_url(settings.store_url())}   (authnotify authorizations list, in this directory)",
        "Send a first notification, from another terminal in this directory:",
        f"  {_simulate_command()}",
        "Stop with Ctrl-C.",
    ]
    return "\n".join(lines)


def _quietly(cleanup: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
    """A stop step whose failure does not keep the later ones from running or end dev with an error."""
    async def run() -> None:
        with contextlib.suppress(Exception):
            await cleanup()

    return run


async def run(args: argparse.Namespace) -> int:
    dev = load(DevSettings)
    base = load_settings()
    keys = ensure_dev_keys(dev.dev_dir)

    async with Lifecycle() as lifecycle:
        # The simulated outside world first: its URLs go into the configuration.
        provisional, _, _ = dev_configuration(base, keys, f"http://{LOCALHOST}", keys.path(MERCHANTS_FILE))
        if not provisional.providers():
            raise CommandError("authnotify dev: no provider configured", EXIT_USAGE)
        configure_logging(provisional.log_format, provisional.log_level)
        configure_tracing(endpoint=provisional.tracing_endpoint(), protocol=provisional.tracing_protocol(),
                          service_name="authnotify-dev")
        log = get_logger("authnotify.dev")
        await check_broker(provisional)

        merchant = MerchantEndpoint(secret=keys.merchant_secret, echo=True)
        merchant_app = merchant.app()

        async def merchant_events(_request: web.Request) -> web.Response:
            # What simulate watches the lifecycle by: ids and fingerprints only, never a token.
            return web.json_response([
                {"id": r.webhook_id, "type": r.event.get("type"),
                 "provider": (r.event.get("data") or {}).get("provider"),
                 "authorizationId": (r.event.get("data") or {}).get("authorizationId"),
                 "accessTokenFingerprint": (r.event.get("data") or {}).get("accessTokenFingerprint"),
                 "status": (r.event.get("data") or {}).get("status")}
                for r in merchant.delivered
            ])

        merchant_app.router.add_get(MERCHANT_EVENTS_PATH, merchant_events)
        merchant_runner, merchant_port = await _serve(merchant_app, LOCALHOST, dev.dev_merchant_port,
                                                      "merchant endpoint", f"{ENV_PREFIX}DEV_MERCHANT_PORT")
        lifecycle.on_stop(_quietly(merchant_runner.cleanup))
        merchant_base = f"http://{LOCALHOST}:{merchant_port}"
        merchant_url = merchant_base + MERCHANT_PATH
        merchants_file = write_merchants_file(keys, merchant_url)
        api_keys_file = write_api_keys_file(keys)

        gateway = AlipayGateway(
            alipay_private_key=keys.alipay_private_key,
            # The gateway checks our applyToken signatures with the key the providers sign with.
            client_public_key=next(iter(provisional.providers().values())).private_key.public_key(),
            ams_client_id=provisional.ams_client_id,
            aps_client_id=provisional.aps_client_id,
            token_secret=keys.gateway_secret,
            access_token_lifetime=timedelta(seconds=dev.dev_access_token_lifetime),
            refresh_token_lifetime=timedelta(seconds=dev.dev_refresh_token_lifetime),
        )
        try:
            running_gateway = await start_alipay_gateway(gateway, host=LOCALHOST, port=dev.dev_gateway_port)
        except OSError as exc:
            raise CommandError(f"authnotify dev: cannot listen on {LOCALHOST}:{dev.dev_gateway_port} for the "
                               f"simulated Alipay gateway ({exc.strerror or exc}): set "
                               f"{ENV_PREFIX}DEV_GATEWAY_PORT to a free port") from None
        lifecycle.on_stop(_quietly(running_gateway.aclose))
        gateway_url = running_gateway.url
        settings, environment, dev_providers = dev_configuration(base, keys, gateway_url, merchants_file,
                                                                 api_keys_file)

        # The workers, then the ingress: the ingress answers S only once a queue holds the message, and on
        # the way out it stops first, while the workers still take what it published.
        resources = Resources(settings)
        lifecycle.on_stop(_quietly(resources.aclose))
        specs = await build_specs(resources, list(CONSUMER_NAMES))
        worker_port = settings.worker_http_port if "worker_http_port" in base.model_fields_set else 0
        workers = Workers(settings, specs, http_port=worker_port)
        await workers.start()
        lifecycle.on_stop(_quietly(workers.stop))

        # The scheduler and the API publish through the workers' connection and share their store.
        store = await resources.store()
        topology = build_topology(settings)
        scheduler = SchedulerLoop(settings, workers.publisher, topology, store=store)
        scheduler.start()
        lifecycle.on_stop(_quietly(scheduler.stop))
        api_runner = web.AppRunner(create_api_app(store, workers.publisher, topology,
                                                  load_api_keys(settings.api_keys_file),
                                                  operator_queues=operator_queues(settings, workers.broker),
                                                  session_key=console_session_key(settings)),
                                   access_log=None, handle_signals=False, shutdown_timeout=DRAIN_TIMEOUT_SECONDS)
        await api_runner.setup()
        lifecycle.on_stop(_quietly(api_runner.cleanup))
        try:
            await web.TCPSite(api_runner, settings.api_host, settings.api_port).start()
        except OSError as exc:
            raise CommandError(f"authnotify dev: cannot listen on {settings.api_host}:{settings.api_port} "
                               f"for the internal API ({exc.strerror or exc}): set AUTHNOTIFY_API_PORT") from None
        api_url = f"http://{settings.api_host}:{settings.api_port}"

        ingress_runner = ingress_runner_for(create_app(settings))
        await ingress_runner.setup()
        lifecycle.on_stop(_quietly(ingress_runner.cleanup))
        try:
            await web.TCPSite(ingress_runner, settings.http_host, settings.http_port,
                              backlog=LISTEN_BACKLOG).start()
        except OSError as exc:
            raise CommandError(f"authnotify dev: cannot listen on {settings.http_host}:{settings.http_port} "
                               f"for the ingress ({exc.strerror or exc}): set AUTHNOTIFY_HTTP_PORT") from None
        host = LOCALHOST if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
        ingress_url = f"http://{host}:{settings.http_port}"
        # The ingress's /metrics on a listener of its own, as in production: the configured port, else any.
        metrics = HealthServer(settings.http_host, settings.metrics_port if "metrics_port" in base.model_fields_set
                               else 0, None, name="metrics")
        await metrics.start()
        lifecycle.on_stop(_quietly(metrics.stop))
        metrics_url = f"http://{host}:{metrics.port}/metrics"

        write_dev_description(keys, {
            "ingress_url": ingress_url,
            "gateway_url": gateway_url,
            "merchant_url": merchant_url,
            "merchant_events_url": merchant_base + MERCHANT_EVENTS_PATH,
            "metrics_url": metrics_url,
            "api_url": api_url,
            "namespace": settings.namespace,
            "database_url": mask_url(settings.store_url()),
            "client_ids": {name: config.client_id for name, config in settings.providers().items()},
            "dev_key_providers": dev_providers,
            "pid": os.getpid(),
        }, environment)

        waiting = asyncio.ensure_future(workers.wait_ready(READY_TIMEOUT_SECONDS))
        stopped = asyncio.ensure_future(lifecycle.stop_requested.wait())
        await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not waiting.done():
            waiting.cancel()
            return EXIT_OK  # stopped before the consumers were up
        if waiting.exception() is not None:
            raise CommandError(f"authnotify dev: the workers did not start within {READY_TIMEOUT_SECONDS:.0f}s "
                               "(is the broker healthy? see the log above)")
        print(run_banner(settings, keys, ingress_url, gateway_url, merchant_url, dev_providers, metrics_url,
                         api_url), flush=True)
        print(READY_LINE, flush=True)
        log.info("dev_ready", ingress=ingress_url, gateway=gateway_url, merchant=merchant_url)
        await lifecycle.run_until_stopped()
        log.info("dev_stopping")
    return EXIT_OK
