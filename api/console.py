"""The operator console, ``GET /`` on the internal API's listener: server-rendered pages over the same
operations as the JSON routes (docs/console.md).

* **Signing in.** A form takes an API key; the session is an encrypted cookie (Fernet, the key of
  ``AUTHNOTIFY_CONSOLE_SESSION_KEY`` or one made per process) holding the SHA-256 of the API key, never the key:
  HttpOnly, SameSite=Strict, Secure when the request came over HTTPS, eight hours after signing in at most. A
  key removed from the keys file ends its sessions at the next restart.
* **Scopes.** A page or an action needs the scope its JSON route needs (:data:`CONSOLE_ROUTES`); without it
  the page says which scope is missing (403).
* **Changes.** Every state-changing request is a POST carrying the session's CSRF token in a form field;
  revoking goes through a confirmation page. Everything works without JavaScript; ``console.js`` only adds
  comforts (a confirm dialog, refreshing the queue figures).
* **Secrets.** No page shows a token (the console never asks for one, whatever the key's scopes), and
  neither the key nor the cookie is ever logged.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp_session import AbstractStorage, Session, get_session, new_session, session_middleware
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography.fernet import Fernet

from authnotify.api.keys import ApiKey, ApiKeys, Scope
from authnotify.domain.authorizations import STATUS_ACTIVE, STATUSES, AuthorizationData
from authnotify.domain.events import history
from authnotify.errors import BrokerUnavailable, PublishFailed, StoreError
from authnotify.messaging.topology import CONSUMER_NAMES
from authnotify.observability.logging import get_logger
from authnotify.operations.authorizations import InvalidRequest, NotFound, find_authorization, revoke
from authnotify.operations.deadletters import OperatorQueues, consumer_names, dead_letter_filter
from authnotify.store.repository import AuthorizationStore

log = get_logger("authnotify.console")

HERE = Path(__file__).parent
COOKIE_NAME = "authnotify_console"
SESSION_SECONDS = 8 * 3600
CSRF_FIELD = "csrf"
PAGE_SIZE = 50
DEAD_LETTER_PAGE_LIMIT = 200

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ConsoleRoute:
    """One page or form of the console: the scope it needs (None: any signed-in key, or none at all)."""

    method: str
    path: str
    handler: str
    scope: Scope | None
    summary: str


CONSOLE_ROUTES: tuple[ConsoleRoute, ...] = (
    ConsoleRoute("GET", "/", "search", Scope.AUTHORIZATIONS_READ,
                 "Search authorizations by id, fingerprint, agreement or merchant"),
    ConsoleRoute("GET", "/authorizations/{key}", "authorization", Scope.AUTHORIZATIONS_READ,
                 "One authorization and its timeline"),
    ConsoleRoute("GET", "/authorizations/{key}/revoke", "confirm_revoke", Scope.AUTHORIZATIONS_REVOKE,
                 "Confirm a revocation"),
    ConsoleRoute("POST", "/authorizations/{key}/revoke", "revoke", Scope.AUTHORIZATIONS_REVOKE, "Revoke"),
    ConsoleRoute("GET", "/dead-letters", "dead_letters", Scope.DLQ_READ, "Dead letters, filtered, per queue"),
    ConsoleRoute("POST", "/dead-letters/replay", "replay", Scope.DLQ_WRITE, "Replay dead letters"),
    ConsoleRoute("GET", "/queues", "queues", Scope.DLQ_READ, "Queue depths and consumers"),
    ConsoleRoute("GET", "/sign-in", "sign_in_form", None, "Sign in with an API key"),
    ConsoleRoute("POST", "/sign-in", "sign_in", None, "Sign in"),
    ConsoleRoute("POST", "/sign-out", "sign_out", None, "Sign out"),
)
STATIC_PATH = "/static"
# What the console serves beside the JSON API (the OpenAPI document describes the JSON routes only).
CONSOLE_PATHS: frozenset[tuple[str, str]] = frozenset(
    {(route.method, route.path) for route in CONSOLE_ROUTES} | {("GET", STATIC_PATH)})
PUBLIC_PAGES = frozenset({"sign_in_form", "sign_in"})  # the rest want a signed-in key

NAVIGATION = (("/", "Authorizations", Scope.AUTHORIZATIONS_READ), ("/dead-letters", "Dead letters", Scope.DLQ_READ),
              ("/queues", "Queues", Scope.DLQ_READ))

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _over_https(request: web.Request) -> bool:
    # A proxy that terminates TLS says so; trusting the header can only make the cookie stricter.
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


class SessionCookies(AbstractStorage):
    """Encrypted cookie sessions: HttpOnly, SameSite=Strict, Secure when the request came over HTTPS."""

    def __init__(self, key: bytes) -> None:
        fernet = Fernet(key)
        options: dict[str, Any] = {"cookie_name": COOKIE_NAME, "max_age": SESSION_SECONDS, "httponly": True,
                                   "samesite": "Strict", "path": "/"}
        super().__init__(**options)
        self._plain = EncryptedCookieStorage(fernet, secure=False, **options)
        self._secure = EncryptedCookieStorage(fernet, secure=True, **options)

    def _storage(self, request: web.Request) -> EncryptedCookieStorage:
        return self._secure if _over_https(request) else self._plain

    async def load_session(self, request: web.Request) -> Session:
        return await self._storage(request).load_session(request)

    async def save_session(self, request: web.Request, response: web.StreamResponse, session: Session) -> None:
        await self._storage(request).save_session(request, response, session)


class Refused(Exception):
    """A page or an action the console will not do; shown as a page with the status and the message."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


@dataclass(frozen=True)
class Operator:
    key: ApiKey
    session: Session

    def may(self, scope: Scope) -> bool:
        return scope.value in self.key.scopes


def _csrf_token(session: Session) -> str:
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_FIELD] = token
    return token


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this console only (never another site)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _merchant(data: AuthorizationData) -> str | None:
    return data.referenceMerchantId or data.authClientId


class Console:
    """The pages, over the store, the publisher and the dead-letter queues the JSON routes use."""

    def __init__(self, keys: ApiKeys, store: AuthorizationStore, publisher: Any, topology: Any,
                 operator_queues: OperatorQueues | None) -> None:
        self.keys = keys
        self.store = store
        self.publisher = publisher
        self.topology = topology
        self.operator_queues = operator_queues

    # --- the frame every page shares -----------------------------------------------------------------

    async def _operator(self, request: web.Request) -> Operator | None:
        session = await get_session(request)
        digest, since = session.get("key"), session.get("since")
        if not isinstance(since, int) or time.time() - since > SESSION_SECONDS:
            return None  # eight hours after signing in, whatever was done since
        key = self.keys.find_digest(digest) if isinstance(digest, str) else None
        return Operator(key, session) if key is not None else None

    def _render(self, request: web.Request, template: str, operator: Operator | None, session: Session,
                http_status: int = 200, **context: Any) -> web.Response:
        flash = session.pop("flash", None)
        navigation = [(path, label, operator is not None and operator.may(scope)) for path, label, scope in NAVIGATION]
        return aiohttp_jinja2.render_template(template, request, {
            "operator": operator, "csrf": _csrf_token(session), "flash": flash, "navigation": navigation,
            "path": request.path, **context}, status=http_status)

    def page(self, route: ConsoleRoute, handler: Callable[..., Awaitable[Any]]) -> Handler:
        """Signed in (else to the sign-in form), the route's scope held, the CSRF token of a POST checked;
        the operations' errors shown as pages."""

        async def serve(request: web.Request) -> web.StreamResponse:
            session = await get_session(request)
            operator = await self._operator(request)
            try:
                if route.handler not in PUBLIC_PAGES:
                    if operator is None:
                        if request.method == "GET":
                            raise web.HTTPSeeOther("/sign-in?" + urlencode({"next": request.path_qs}))
                        raise Refused(401, "Signed out", "Your session has ended: sign in again, then repeat this.")
                    if route.scope is not None and not operator.may(route.scope):
                        raise Refused(403, "Refused", f"The key {operator.key.name!r} lacks the scope "
                                                      f"{route.scope.value}, which this page needs.")
                if request.method == "POST":
                    form = await request.post()
                    sent = form.get(CSRF_FIELD)
                    expected = session.get(CSRF_FIELD)
                    if not (isinstance(sent, str) and isinstance(expected, str)
                            and hmac.compare_digest(sent.encode(), expected.encode())):
                        log.warning("console_csrf_refused", path=request.path,
                                    key_name=operator.key.name if operator else None)
                        raise Refused(403, "Refused", "This form is not from this console session (its CSRF token "
                                                      "does not match): reload the page and try again.")
                result = await handler(request, operator, session)
                if isinstance(result, web.StreamResponse):
                    return result
                template, context = result
                return self._render(request, template, operator, session, **context)
            except Refused as refused:
                return self._render(request, "message.html", operator, session, http_status=refused.status,
                                    title=refused.title, message=refused.message)
            except NotFound as exc:
                return self._render(request, "message.html", operator, session, http_status=404, title="Not found",
                                    message=str(exc))
            except InvalidRequest as exc:
                return self._render(request, "message.html", operator, session, http_status=400, title="Not understood",
                                    message=str(exc))
            except (StoreError, PublishFailed, BrokerUnavailable) as exc:
                log.warning("console_unavailable", path=request.path, error=str(exc)[:200])
                return self._render(request, "message.html", operator, session, http_status=503, title="Unavailable",
                                    message="The database or the broker is unavailable right now; try again shortly.")

        return serve

    # --- signing in and out ---------------------------------------------------------------------------

    async def sign_in_form(self, request: web.Request, operator: Operator | None, session: Session) -> Any:
        if operator is not None:
            raise web.HTTPSeeOther(_safe_next(request.query.get("next")))
        return "sign_in.html", {"next": _safe_next(request.query.get("next")), "error": None}

    async def sign_in(self, request: web.Request, operator: Operator | None, session: Session) -> Any:
        form = await request.post()
        presented = form.get("key")
        target = _safe_next(str(form.get("next") or "/"))
        key = self.keys.find(presented.strip()) if isinstance(presented, str) and presented.strip() else None
        if key is None:
            log.info("console_sign_in_refused", reason="unknown key" if presented else "no key")
            response = self._render(request, "sign_in.html", None, session, http_status=401, next=target,
                                    error="That is not a key of this API (AUTHNOTIFY_API_KEYS_FILE).")
            return response
        fresh = await new_session(request)  # a new session (and CSRF token) for the signed-in key
        fresh["key"] = key.sha256
        fresh["since"] = int(time.time())
        fresh[CSRF_FIELD] = secrets.token_urlsafe(32)
        log.info("console_signed_in", key_name=key.name, scopes=sorted(key.scopes))
        raise web.HTTPSeeOther(target)

    async def sign_out(self, request: web.Request, operator: Operator | None, session: Session) -> Any:
        assert operator is not None
        log.info("console_signed_out", key_name=operator.key.name)
        session.invalidate()
        raise web.HTTPSeeOther("/sign-in")

    # --- authorizations --------------------------------------------------------------------------------

    async def search(self, request: web.Request, operator: Operator | None, session: Session) -> Any:
        query = (request.query.get("q") or "").strip()
        status = request.query.get("status") or None
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"status: one of {', '.join(STATUSES)}")
        found: list[AuthorizationData] = []
        if query:
            try:
                found.append(await find_authorization(self.store, query))
            except NotFound:
                pass
            page = await self.store.page_authorizations(merchant=query, status=status, limit=PAGE_SIZE)
            known = {item.authorizationId for item in found}
            found += [item for item in page.items if item.authorizationId not in known]
            more = page.next_after is not None
        else:
            page = await self.store.page_authorizations(status=status, limit=PAGE_SIZE)
            found, more = page.items, page.next_after is not None
        return "search.html", {"query": query, "status_filter": status, "statuses": STATUSES, "items": found, "more": more,
                               "merchant_of": _merchant}

    async def authorization(self, request: web.Request, operator: Operator | None, session: Session) -> Any:
        assert operator is not None
        found = await find_authorization(self.store, request.match_info["key"])
        assert found.authorizationId is not None
        timeline = await self.store.timeline(found.authorizationId)
        if timeline is None:  # pragma: no cover - rows are never deleted
            raise NotFound(f"authorization {found.authorizationId} vanished")
        data = timeline.authorization
        return "authorization.html", {
            "authorization": data, "fields": list(data.model_dump().items()), "history": history(timeline),
            "may_revoke": operator.may(Scope.AUTHORIZATIONS_REVOKE) and data.status == STATUS_ACTIVE}

    async def confirm_revoke(self, request: web.Request, operator: Operator | None, session: Session) -> Any:
        found = await find_authorization(self.store, request.match_info["key"])
        return "revoke.html", {"authorization": found, "merchant": _merchant(found)}

    async def revoke(self, request: web.Request, operator: Operator | None, session: Session) -> Any:
        assert operator is not None
        form = await request.post()
        reason = str(form.get("reason") or "").strip() or None
        command = await revoke(self.store, self.publisher, self.topology, request.match_info["key"], reason)
        log.info("revocation_queued", key_name=operator.key.name, authorization_id=command.authorizationId,
                 command_id=command.commandId, via="console")
        session["flash"] = (f"Revocation queued (command {command.commandId}): the revocations worker revokes it at "
                            "Alipay, then the authorization is canceled.")
        raise web.HTTPSeeOther(f"/authorizations/{command.authorizationId}")

    # --- dead letters and queues ------------------------------------------------------------------------

    def _queues(self) -> OperatorQueues:
        if self.operator_queues is None:
            raise BrokerUnavailable("no broker connection for the dead letters")
        return self.operator_queues

    async def dead_letters(self, request: web.Request, operator: Operator | None, session: Session) -> Any:
        assert operator is not None
        query = request.query
        chosen_queue = query.get("queue") or ""
        names = consumer_names([chosen_queue] if chosen_queue else [])
        filters = {"merchant": (query.get("merchant") or "").strip(), "since": (query.get("since") or "").strip(),
                   "reason": (query.get("reason") or "").strip()}
        chosen = dead_letter_filter(**filters)
        listing = await self._queues().list(names, chosen, DEAD_LETTER_PAGE_LIMIT)
        by_queue: dict[str, list[dict[str, Any]]] = {}
        for letter in listing.items:
            by_queue.setdefault(letter.queue, []).append(asdict(letter))
        return "dead_letters.html", {"by_queue": by_queue, "queue": chosen_queue, "consumers": CONSUMER_NAMES,
                                     "filters": filters, "more": listing.more, "limit": DEAD_LETTER_PAGE_LIMIT,
                                     "may_replay": operator.may(Scope.DLQ_WRITE)}

    async def replay(self, request: web.Request, operator: Operator | None, session: Session) -> Any:
        assert operator is not None
        form = await request.post()
        if not form.get("queue"):
            raise InvalidRequest("queue: which dead-letter queue to replay from")
        [queue] = consumer_names([str(form["queue"])])
        ids = [str(value) for value in form.getall("id", []) if str(value)]
        everything = form.get("all") == "1"
        if not ids and not everything:
            raise InvalidRequest("choose messages to replay, or all of the queue")
        filters = {name: str(form.get(name) or "").strip() for name in ("merchant", "since", "reason")}
        replayed = await self._queues().replay(queue, ids=ids, filter=dead_letter_filter(**filters))
        count = len(replayed.items)
        log.info("dead_letters_replayed", key_name=operator.key.name, queue=queue, replayed=count,
                 ids=[letter.id for letter in replayed.items][:100], not_found=len(replayed.not_found), via="console")
        message = f"Replayed {count} message{'' if count == 1 else 's'} of {queue}."
        if replayed.not_found:
            message += f" Not found (already replayed or purged?): {', '.join(replayed.not_found)}."
        session["flash"] = message
        back = {name: value for name, value in {"queue": str(form.get("back_queue") or ""), **filters}.items() if value}
        raise web.HTTPSeeOther("/dead-letters" + (f"?{urlencode(back)}" if back else ""))

    async def queues(self, request: web.Request, operator: Operator | None, session: Session) -> Any:
        stats = await self._queues().stats()
        rows: dict[str, dict[str, Any]] = {}
        for figures in stats:
            row = rows.setdefault(figures.consumer or "unrouted", {
                "name": figures.consumer or "unrouted", "queue": None, "ready": None, "unacknowledged": None,
                "consumers": None, "retrying": 0, "dead": None})
            if figures.kind in ("consumer", "unrouted"):
                row.update(queue=figures.name, ready=figures.ready, unacknowledged=figures.unacknowledged,
                           consumers=figures.consumers)
            elif figures.kind == "retry":
                row["retrying"] += figures.ready or 0
            else:
                row["dead"] = figures.ready
        unknown_unacked = any(figures.unacknowledged is None for figures in stats if figures.ready is not None)
        return "queues.html", {"rows": list(rows.values()), "unknown_unacked": unknown_unacked}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if response.content_type == "text/html":
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)


def add_console(app: web.Application, console: Console) -> None:
    """The console's pages, its static files and its session cookies on the API's application."""
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                         undefined=jinja2.StrictUndefined)
    for route in CONSOLE_ROUTES:
        app.router.add_route(route.method, route.path, console.page(route, getattr(console, route.handler)))
    app.router.add_static(STATIC_PATH, HERE / "static", name="static", append_version=True)
    app.on_response_prepare.append(_security_headers)


def console_middleware(session_key: bytes | None) -> Any:
    """The session middleware; a key made for this process when none is configured."""
    return session_middleware(SessionCookies(session_key or Fernet.generate_key()))
