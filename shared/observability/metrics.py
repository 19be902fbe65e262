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
REVOKE_TOKEN_SECONDS = Histogram(
    "authnotify_revoke_token_seconds",
    "AMS revoke and Alipay+ cancelToken round trip to Alipay, by provider.",
    ["provider"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
REVOKE_TOKEN_RESULTS = Counter(
    "authnotify_revoke_token_results_total",
    "AMS revoke and Alipay+ cancelToken outcomes by provider and result (as for applyToken).",
    ["provider", "result"],
)
TOKEN_REFRESHES = Counter(
    "authnotify_token_refreshes_total",
    "What the token-refresh worker did with a request, by provider and outcome (refreshed, expired, retried, "
    "skipped).",
    ["provider", "outcome"],
)
REVOCATIONS = Counter(
    "authnotify_revocations_total",
    "What the revocations worker did with a command, by provider and outcome (canceled, already_invalid, "
    "no_op, failed, retried).",
    ["provider", "outcome"],
)
AUTHORIZATIONS = Gauge(
    "authnotify_authorizations", "Stored authorizations by status (the scheduler counts them each pass).",
    ["status"],
)
TOKENS_EXPIRING = Gauge(
    "authnotify_tokens_expiring",
    "Active authorizations whose access or refresh token expires within 24h or 7d (counted each pass).",
    ["token", "within"],
)
SCHEDULER_LAG_SECONDS = Gauge(
    "authnotify_scheduler_lag_seconds",
    "Now minus the oldest due time of lifecycle work (refresh, expiry, warning) not yet published.",
)
SCHEDULER_PASS_SECONDS = Histogram(
    "authnotify_scheduler_pass_seconds", "One scheduler pass: claiming, publishing and recording due work.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SCHEDULER_PUBLISHED = Counter(
    "authnotify_scheduler_published_total",
    "What the scheduler published, by kind (refresh, expiring) and outcome (published, failed).",
    ["kind", "outcome"],
)
UNBINDING_CONSULTATIONS = Counter(
    "authnotify_unbinding_consultations_total",
    "Alipay+ consultUnbinding requests the ingress answered, by outcome (allowed, refused, or the resultCode).",
    ["outcome"],
)
API_REQUESTS = Counter(
    "authnotify_api_requests_total", "Internal API requests by route and HTTP status.", ["route", "status"],
)
# merchant: the merchant registry entry's name ("default" or a merchant id; a bounded set), NO_MERCHANT when none.
MERCHANT_DELIVERIES = Counter(
    "authnotify_merchant_deliveries_total",
    "Merchant webhook deliveries by registry entry and outcome (delivered, failed, circuit_open: not attempted, "
    "filtered, no_endpoint).",
    ["merchant", "outcome"],
)
MERCHANT_DELIVERY_SECONDS = Histogram(
    "authnotify_merchant_delivery_seconds", "Merchant webhook round trip, by registry entry.", ["merchant"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
)
MERCHANT_CIRCUIT_OPEN = Gauge(
    "authnotify_merchant_circuit_open",
    "1 while this worker holds a merchant's events back after consecutive failed deliveries, else 0.",
    ["merchant"],
)
NO_MERCHANT = "(none)"


def render_metrics() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
