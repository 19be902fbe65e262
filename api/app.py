"""The internal API's handlers, its key check and its problems, in one aiohttp application.

Every route is one line of :data:`~authnotify.api.routes.ROUTES` (method, path, scope, handler, what it
answers): the router and the OpenAPI document are both made from that table, and a test checks the document
against the routes the application really has. A request to a route with a scope carries
``Authorization: Bearer <key>``: none, or an unknown key, answers 401; a key without the scope, 403. Every
error is an RFC 9457 problem.

The work is :mod:`authnotify.operations`' (shared with the command line); ``POST .../access-token`` writes
one audit line per call (key name, authorizationId, outcome), and is the only answer that carries a token.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from authnotify.api.console import Console, add_console, console_middleware
from authnotify.api.keys import ApiKey, ApiKeys
from authnotify.api.models import (
    AccessTokenAnswer,
    AuthorizationDetail,
    AuthorizationPage,
    CommandStatus,
    DeadLetterItem,
    DeadLetterList,
    QueueFigures,
    QueueList,
    ReplayAnswer,
    ReplayRequest,
    RevokeAccepted,
    RevokeRequest,
)
from authnotify.api.openapi import openapi_document
from authnotify.api.problems import ApiProblem, problem_response
from authnotify.api.routes import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, ROUTES
from authnotify.config.values import parse_duration
from authnotify.domain.authorizations import STATUSES, iso_utc
from authnotify.domain.events import history
from authnotify.errors import BrokerUnavailable, PublishFailed, StoreError
from authnotify.messaging.health import add_health_routes, add_metrics_route
from authnotify.messaging.publisher import Publisher
from authnotify.messaging.topology import Topology
from authnotify.observability.logging import get_logger
from authnotify.observability.metrics import API_REQUESTS
from authnotify.operations.authorizations import (
    InvalidRequest,
    NotActive,
    NotFound,
    RefreshPending,
    access_token,
    find_authorization,
    revoke,
    shown_key,
)
from authnotify.operations.deadletters import OperatorQueues, consumer_names, dead_letter_filter, list_limit
from authnotify.store.repository import AuthorizationStore

log = get_logger("authnotify.api")
audit = get_logger("authnotify.audit")

MAX_REQUEST_BYTES = 16 * 1024
REFRESH_RETRY_AFTER_SECONDS = "5"

STORE_KEY = web.AppKey("store", AuthorizationStore)
API_KEY = web.AppKey("api", object)
REQUEST_KEY_NAME = web.RequestKey("api_key", ApiKey)


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(model.model_dump(mode="json")), status=status,
                        content_type="application/json", headers=headers)


def body_problem(exc: ValidationError) -> ApiProblem:
    """A body that does not validate: 400 naming the first field at fault."""
    first = exc.errors(include_input=False, include_url=False)[0]
    location = ".".join(str(part) for part in first.get("loc", ())) or "body"
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return ApiProblem(400, "invalid-body", f"{location}: {message}")


def encode_cursor(position: tuple[datetime, str]) -> str:
    raw = orjson.dumps([position[0].isoformat(), position[1]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, authorization_id = orjson.loads(raw)
        return datetime.fromisoformat(created_at), str(authorization_id)
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError):
        raise ApiProblem(400, "invalid-cursor", "cursor: not a cursor this API handed out") from None


class Api:
    """The handlers, over the store, the publisher and the keys they share."""

    def __init__(self, store: AuthorizationStore, publisher: Publisher, topology: Topology, keys: ApiKeys,
                 operator_queues: OperatorQueues | None = None) -> None:
        self.store = store
        self.publisher = publisher
        self.topology = topology
        self.keys = keys
        self.operator_queues = operator_queues

    def dead_letter_queues(self) -> OperatorQueues:
        if self.operator_queues is None:
            raise BrokerUnavailable("this process has no broker connection for the dead letters")
        return self.operator_queues

    async def list_authorizations(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        unknown = sorted(set(query) - {"status", "provider", "merchant", "expiringWithin", "limit", "cursor"})
        if unknown:
            raise ApiProblem(400, "invalid-query", f"unknown query parameter {unknown[0]!r}")
        status = query.get("status") or None
        if status is not None and status not in STATUSES:
            raise ApiProblem(400, "invalid-query", f"status: one of {', '.join(STATUSES)}")
        provider = query.get("provider") or None
        if provider is not None and provider not in ("ams", "aps"):
            raise ApiProblem(400, "invalid-query", "provider: ams or aps")
        expiring_before = None
        if query.get("expiringWithin"):
            try:
                expiring_before = datetime.now(UTC) + timedelta(seconds=parse_duration(query["expiringWithin"]))
            except ValueError as exc:
                raise ApiProblem(400, "invalid-query", f"expiringWithin: {exc}") from None
        try:
            limit = int(query.get("limit") or DEFAULT_PAGE_SIZE)
        except ValueError:
            raise ApiProblem(400, "invalid-query", "limit: a whole number") from None
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ApiProblem(400, "invalid-query", f"limit: 1 to {MAX_PAGE_SIZE}")
        after = decode_cursor(query["cursor"]) if query.get("cursor") else None
        page = await self.store.page_authorizations(status=status, merchant=query.get("merchant") or None,
                                                    provider=provider, expiring_before=expiring_before,
                                                    after=after, limit=limit)
        return _json(AuthorizationPage(items=page.items,
                                       nextCursor=encode_cursor(page.next_after) if page.next_after else None))

    async def get_authorization(self, request: web.Request) -> web.StreamResponse:
        found = await find_authorization(self.store, request.match_info["key"])
        assert found.authorizationId is not None
        timeline = await self.store.timeline(found.authorizationId)
        if timeline is None:  # pragma: no cover - rows are never deleted
            raise NotFound(f"authorization {found.authorizationId} vanished")
        detail = AuthorizationDetail(**timeline.authorization.model_dump(), history=history(timeline))
        return _json(detail)

    async def access_token(self, request: web.Request) -> web.StreamResponse:
        key: ApiKey = request[REQUEST_KEY_NAME]
        asked = request.match_info["key"]
        authorization_id: str | None = None
        outcome = "error"
        try:
            found = await access_token(self.store, self.publisher, self.topology, asked)
            authorization_id = found.authorization.authorizationId
            outcome = "refreshed" if found.refreshed else "issued"
            answer = AccessTokenAnswer(authorizationId=authorization_id or "", accessToken=found.access_token,
                                       accessTokenExpiryTime=iso_utc(found.access_token_expires_at))
            return _json(answer, headers={"Cache-Control": "no-store"})
        except NotFound:
            outcome = "not_found"
            raise
        except NotActive as exc:
            authorization_id = exc.authorization.authorizationId
            outcome = f"not_active ({exc.authorization.status})"
            raise
        except RefreshPending:
            outcome = "refresh_pending"
            raise
        finally:
            # The audit line: who asked for which authorization's token, and what came of it; never the token.
            audit.info("access_token_requested", key_name=key.name, authorization_id=authorization_id,
                       key_asked=shown_key(asked) if authorization_id is None else None, outcome=outcome)

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = RevokeRequest.model_validate_json(raw) if raw.strip() else RevokeRequest()
        except ValidationError as exc:
            raise body_problem(exc) from None
        command = await revoke(self.store, self.publisher, self.topology, request.match_info["key"], body.reason)
        key: ApiKey = request[REQUEST_KEY_NAME]
        log.info("revocation_queued", key_name=key.name, authorization_id=command.authorizationId,
                 command_id=command.commandId)
        return _json(RevokeAccepted(commandId=command.commandId), status=202,
                     headers={"Location": f"/v1/commands/{command.commandId}"})

    async def command(self, request: web.Request) -> web.StreamResponse:
        outcome = await self.store.command(request.match_info["command_id"])
        if outcome is None:
            raise ApiProblem(404, "not-found", "no outcome recorded for this command (yet)")
        return _json(CommandStatus(commandId=outcome.command_id, kind=outcome.kind,
                                   authorizationId=outcome.authorization_id, status=outcome.status,
                                   detail=outcome.detail, attempts=outcome.attempts,
                                   updatedAt=iso_utc(outcome.updated_at) or ""))

    async def list_dead_letters(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        unknown = sorted(set(query) - {"queue", "merchant", "since", "reason", "limit"})
        if unknown:
            raise ApiProblem(400, "invalid-query", f"unknown query parameter {unknown[0]!r}")
        try:
            names = consumer_names(query.getall("queue", []))
            chosen = dead_letter_filter(merchant=query.get("merchant"), since=query.get("since"),
                                        reason=query.get("reason"))
            limit = list_limit(query.get("limit"))
        except InvalidRequest as exc:
            raise ApiProblem(400, "invalid-query", str(exc)) from None
        listing = await self.dead_letter_queues().list(names, chosen, limit)
        return _json(DeadLetterList(items=[DeadLetterItem(**asdict(letter)) for letter in listing.items],
                                    more=listing.more))

    async def replay_dead_letters(self, request: web.Request) -> web.StreamResponse:
        try:
            body = ReplayRequest.model_validate_json(await request.read())
        except ValidationError as exc:
            raise body_problem(exc) from None
        chosen = dead_letter_filter(merchant=body.merchant, since=body.since, reason=body.reason)
        replayed = await self.dead_letter_queues().replay(body.queue.value, ids=body.ids or (), filter=chosen)
        key: ApiKey = request[REQUEST_KEY_NAME]
        log.info("dead_letters_replayed", key_name=key.name, queue=body.queue.value, replayed=len(replayed.items),
                 ids=[letter.id for letter in replayed.items][:100], not_found=len(replayed.not_found))
        return _json(ReplayAnswer(replayed=len(replayed.items), notFound=replayed.not_found))

    async def queues(self, request: web.Request) -> web.StreamResponse:
        stats = await self.dead_letter_queues().stats()
        return _json(QueueList(queues=[QueueFigures(**asdict(figures)) for figures in stats]))

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(openapi_document()), content_type="application/json")


_SCOPE_OF = {(route.method, route.path): route.scope for route in ROUTES}


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _guard(keys: ApiKeys) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else "unmatched"
        status = 500
        try:
            scope = _SCOPE_OF.get((request.method, canonical))
            if scope is not None:
                presented = _bearer(request)
                key = keys.find(presented) if presented else None
                if key is None:
                    raise ApiProblem(401, "unauthorized", "an API key is required: Authorization: Bearer <key>"
                                     if presented is None else "unknown API key",
                                     headers={"WWW-Authenticate": 'Bearer realm="authnotify"'})
                if scope.value not in key.scopes:
                    raise ApiProblem(403, "forbidden", f"this key lacks the scope {scope.value}")
                request[REQUEST_KEY_NAME] = key
            response = await handler(request)
            status = response.status
            return response
        except ApiProblem as problem:
            status = problem.status
            return problem_response(problem.status, problem.kind, problem.detail, headers=problem.headers)
        except NotFound as exc:
            status = 404
            return problem_response(404, "not-found", str(exc))
        except NotActive as exc:
            status = 409
            return problem_response(409, "not-active", str(exc))
        except InvalidRequest as exc:
            status = 400
            return problem_response(400, "invalid-body", str(exc))
        except RefreshPending as exc:
            status = 503
            return problem_response(503, "refresh-pending", str(exc),
                                    headers={"Retry-After": REFRESH_RETRY_AFTER_SECONDS})
        except (StoreError, PublishFailed, BrokerUnavailable) as exc:
            status = 503
            log.warning("api_unavailable", route=canonical, error=str(exc))
            return problem_response(503, "unavailable", "the database or the broker is unavailable; try again")
        except web.HTTPRedirection as exc:  # the console's redirects stay redirects
            status = exc.status
            raise
        except web.HTTPException as exc:  # no such route, or a method it does not take
            status = exc.status
            kind = {404: "not-found", 405: "method-not-allowed", 413: "too-large"}.get(exc.status, "http-error")
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return problem_response(exc.status, kind, exc.reason, headers=headers)
        except Exception as exc:  # a bug: a problem, never a traceback
            log.error("api_error", route=canonical, error=type(exc).__name__)
            return problem_response(500, "internal-error", "an unexpected error; it was logged")
        finally:
            API_REQUESTS.labels(route=f"{request.method} {canonical}", status=str(status)).inc()

    return guard


def create_api_app(store: AuthorizationStore, publisher: Publisher, topology: Topology, keys: ApiKeys, *,
                   ready: Callable[[], bool] | None = None, operator_queues: OperatorQueues | None = None,
                   session_key: bytes | None = None) -> web.Application:
    """The JSON API under /v1 and the console under / (its sessions encrypted with ``session_key``, or with a
    key made for this process). Without ``operator_queues`` the dead-letter and queue routes answer 503."""
    api = Api(store, publisher, topology, keys, operator_queues)
    app = web.Application(middlewares=[_guard(keys), console_middleware(session_key)],
                          client_max_size=MAX_REQUEST_BYTES)
    app[STORE_KEY] = store
    app[API_KEY] = api
    for route in ROUTES:
        app.router.add_route(route.method, route.path, getattr(api, route.handler))
    add_console(app, Console(keys, store, publisher, topology, operator_queues))
    add_health_routes(app, ready or (lambda: publisher.ready), not_ready="broker unavailable")
    # Internal listener (never Alipay's): its metrics are scraped here, beside the health routes.
    add_metrics_route(app)
    return app
