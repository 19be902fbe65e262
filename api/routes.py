"""Every route of the internal API, as data: the router (:mod:`authnotify.api.app`) and the OpenAPI document
(:mod:`authnotify.api.openapi`) are both made from this table."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from authnotify.api.keys import Scope
from authnotify.api.models import (
    AccessTokenAnswer,
    AuthorizationDetail,
    AuthorizationPage,
    CommandStatus,
    DeadLetterList,
    QueueList,
    ReplayAnswer,
    ReplayRequest,
    RevokeAccepted,
    RevokeRequest,
)
from authnotify.messaging.topology import CONSUMER_NAMES
from authnotify.operations.deadletters import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class Route:
    """One route: what the router serves (``handler`` names a method of the API) and what the document says."""

    method: str
    path: str
    scope: Scope | None
    handler: str
    summary: str
    answer: type[BaseModel] | None = None
    status: int = 200
    body: type[BaseModel] | None = None
    body_required: bool = False
    query: tuple[tuple[str, str], ...] = ()  # (name, description)
    errors: tuple[int, ...] = ()


AUTH_ERRORS = (401, 403)
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/authorizations", Scope.AUTHORIZATIONS_READ, "list_authorizations",
          "Stored authorizations, oldest first, a page at a time", AuthorizationPage,
          query=(("status", "active, canceled or expired"), ("provider", "ams or aps"),
                 ("merchant", "referenceMerchantId or authClientId"),
                 ("expiringWithin", "a duration (24h, 7d): active ones whose refresh token (or access token, "
                                    "where there is none) expires within it"),
                 ("limit", f"1 to {MAX_PAGE_SIZE} (default {DEFAULT_PAGE_SIZE})"),
                 ("cursor", "nextCursor of the previous page")),
          errors=(400, *AUTH_ERRORS)),
    Route("GET", "/v1/authorizations/{key}", Scope.AUTHORIZATIONS_READ, "get_authorization",
          "One authorization (by authorizationId, any fingerprint it held, or referenceAgreementId) and its history",
          AuthorizationDetail, errors=(*AUTH_ERRORS, 404)),
    Route("POST", "/v1/authorizations/{key}/access-token", Scope.TOKENS_READ, "access_token",
          "Its access token, refreshed first when it expires within 60 s; audited", AccessTokenAnswer,
          errors=(*AUTH_ERRORS, 404, 409, 503)),
    Route("POST", "/v1/authorizations/{key}/revoke", Scope.AUTHORIZATIONS_REVOKE, "revoke",
          "Revoke it at Alipay, then cancel it: queues the command and returns its id", RevokeAccepted,
          status=202, body=RevokeRequest, errors=(400, *AUTH_ERRORS, 404, 503)),
    Route("GET", "/v1/commands/{command_id}", Scope.AUTHORIZATIONS_READ, "command",
          "The outcome of a command (a revocation)", CommandStatus, errors=(*AUTH_ERRORS, 404)),
    Route("GET", "/v1/dlq", Scope.DLQ_READ, "list_dead_letters",
          "Dead-lettered messages, without consuming them (what `authnotify dlq list --json` prints)", DeadLetterList,
          query=(("queue", f"a consumer ({', '.join(CONSUMER_NAMES)}); repeat for several; default: all"),
                 ("merchant", "only messages whose referenceMerchantId (else authClientId) is this"),
                 ("since", "only messages dead-lettered at or after this ISO 8601 time (UTC without an offset)"),
                 ("reason", "only messages whose reason contains this, in any case"),
                 ("limit", f"1 to {MAX_LIST_LIMIT} (default {DEFAULT_LIST_LIMIT})")),
          errors=(400, *AUTH_ERRORS, 503)),
    Route("POST", "/v1/dlq/replay", Scope.DLQ_WRITE, "replay_dead_letters",
          "Move dead letters back to the queue they died in: each confirmed by the broker before it is removed",
          ReplayAnswer, body=ReplayRequest, body_required=True, errors=(400, *AUTH_ERRORS, 503)),
    Route("GET", "/v1/queues", Scope.DLQ_READ, "queues",
          "Every queue of the namespace: messages ready and unacknowledged, and consumers", QueueList,
          errors=(*AUTH_ERRORS, 503)),
    Route("GET", "/v1/openapi.json", None, "openapi", "This document"),
)
# Served beside the routes above, without a key: for the platform's probes and scraper.
HEALTH_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/healthz", "200 while the process runs"),
    ("GET", "/readyz", "200 while the broker can be used, else 503"),
    ("GET", "/metrics", "Prometheus text format"),
)
