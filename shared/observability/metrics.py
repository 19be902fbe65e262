"""Prometheus metrics (docs/operations.md). Labels never carry tokens, codes or ids: only bounded sets."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

NOTIFICATIONS_RECEIVED = Counter(
    "authnotify_notifications_received_total",
    "Notifications the ingress answered, by provider and outcome (the resultCode it answered).",
    ["provider", "outcome"],
)
PUBLISH_CONFIRM_SECONDS = Histogram(
    "authnotify_publish_confirm_seconds",
    "Time from publishing a notification to the broker's confirm.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
INGRESS_INFLIGHT = Gauge(
    "authnotify_ingress_publishes_in_flight", "Publishes awaiting a broker confirm in the ingress."
)
INGRESS_BODY_BYTES_HELD = Gauge(
    "authnotify_ingress_body_bytes_held", "Bytes of request bodies still arriving, held by the ingress."
)
BROKER_CONNECTED = Gauge(
    "authnotify_broker_connected", "1 while the broker connection and channel are open, else 0."
)
MESSAGES_PROCESSED = Counter(
    "authnotify_messages_processed_total",
    "Messages a worker finished with, by consumer queue and outcome (ok, retried, dead-lettered).",
    ["queue", "outcome"],
)
MESSAGE_HANDLING_SECONDS = Histogram(
    "authnotify_message_handling_seconds",
    "Time a worker spends on one message, handler and acknowledgement included.",
    ["queue"],
)
APPLY_TOKEN_SECONDS = Histogram(
    "authnotify_apply_token_seconds",
    "applyToken round trip to Alipay, by provider.",
    ["provider"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
APPLY_TOKEN_RESULTS = Counter(
    "authnotify_apply_token_results_total",
    "applyToken outcomes by provider and result (S, F, U, http_error, timeout, connection_error, bad_signature, bad_response).",
    ["provider", "result"],
)
MERCHANT_DELIVERIES = Counter(
    "authnotify_merchant_deliveries_total",
    "Merchant webhook deliveries by outcome (delivered, failed, filtered, no_endpoint).",
    ["outcome"],
)
MERCHANT_DELIVERY_SECONDS = Histogram(
    "authnotify_merchant_delivery_seconds", "Merchant webhook round trip."
)


def render_metrics() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
