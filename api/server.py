"""``authnotify api``: serve the internal API on ``AUTHNOTIFY_API_HOST``:``AUTHNOTIFY_API_PORT`` until SIGTERM.

It needs the API keys file, the database (with the token keys: it hands out access tokens) and the broker
(revocations and on-demand refreshes are queued). On a stop signal the listener closes, the requests in
flight finish, then the broker and the database close.
"""

from __future__ import annotations

from aiohttp import web

from authnotify.api.app import create_api_app
from authnotify.api.keys import load_api_keys
from authnotify.config import Need, Settings, check_needs
from authnotify.errors import EXIT_OK, CommandError, StoreError
from authnotify.messaging.connection import Broker
from authnotify.messaging.lifecycle import Lifecycle, listen
from authnotify.messaging.publisher import ConfirmedPublisher
from authnotify.messaging.queue_stats import BrokerMetrics
from authnotify.messaging.topology import build_topology
from authnotify.observability.logging import get_logger
from authnotify.operations.deadletters import OperatorQueues
from authnotify.store import open_store

log = get_logger("authnotify.api")

# What the api reads of the configuration: no Alipay keys (an on-demand refresh is queued for the token-refresh
# worker) and no merchant registry.
API_NEEDS = frozenset({Need.BROKER, Need.DATABASE, Need.TOKEN_KEYS, Need.API_KEYS_FILE})

PUBLISH_TIMEOUT_SECONDS = 5.0
DRAIN_TIMEOUT_SECONDS = 15.0  # an on-demand refresh waits 10 s at most


def operator_queues(settings: Settings, broker: Broker) -> OperatorQueues:
    """The dead letters and queue figures on the process's broker connection (RabbitMQ's Prometheus endpoints
    for the unacknowledged counts, unless AUTHNOTIFY_RABBITMQ_METRICS_URLS is "none")."""
    urls = settings.broker_metrics_urls()
    metrics = BrokerMetrics(urls, settings.broker_vhost()) if urls else None
    return OperatorQueues(broker, broker.topology, metrics)


def console_session_key(settings: Settings) -> bytes | None:
    """AUTHNOTIFY_CONSOLE_SESSION_KEY, or None: the console then makes a key for this process."""
    key = settings.console_session_key
    return key.get_secret_value().strip().encode() if key is not None else None


async def run_api(settings: Settings) -> int:
    check_needs(settings, API_NEEDS)
    keys = load_api_keys(settings.api_keys_file)
    token_keys = settings.require_token_keys()
    if (settings.api_host, settings.api_port) == (settings.http_host, settings.http_port):
        raise CommandError(f"authnotify: the api cannot share the ingress's listener {settings.api_host}:"
                           f"{settings.api_port}: set AUTHNOTIFY_API_PORT")
    listener = listen(settings.api_host, settings.api_port)
    topology = build_topology(settings)
    try:
        store = await open_store(settings.store_url(), token_keys)
    except StoreError as exc:
        listener.close()
        raise CommandError(f"authnotify: {exc}") from None
    async with Lifecycle() as lifecycle:
        lifecycle.on_stop(store.close)
        broker = Broker(settings.broker_url(), topology, connection_name="authnotify-api")
        publisher = ConfirmedPublisher(broker, name="api", confirm_timeout=PUBLISH_TIMEOUT_SECONDS)
        publisher.start()
        lifecycle.on_stop(broker.close)
        lifecycle.on_stop(publisher.close)
        app = create_api_app(store, publisher, topology, keys, operator_queues=operator_queues(settings, broker),
                             session_key=console_session_key(settings))
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=DRAIN_TIMEOUT_SECONDS)
        await runner.setup()
        lifecycle.on_stop(runner.cleanup)
        await web.SockSite(runner, listener).start()
        log.info("api_listening", host=settings.api_host, port=settings.api_port, keys=len(keys.keys))
        await lifecycle.run_until_stopped()
        log.info("api_stopping")
    return EXIT_OK
