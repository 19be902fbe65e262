"""A fake Alipay gateway serving ``applyToken`` (auth codes and refresh tokens), AMS ``revoke`` and Alipay+
``cancelToken``, for AMS (production and sandbox paths) and Alipay+.

Used by the tests and by ``authnotify dev``. It behaves like the real gateway where authnotify can tell:
it checks the content type, our ``Client-Id`` and our request signature (with our public key), validates
the body, and answers signed with the simulated Alipay's private key over
``POST <path>\\n<Client-Id>.<Response-Time>.<body>``. Refusals are Alipay-style answers (HTTP 401/415 with
``resultStatus`` F), signed too.

By default every auth code is exchanged for tokens derived by HMAC from the code and a secret: the same code
always gives the same tokens, and nobody without the secret can guess them. A refresh token is exchanged
the same way for a new pair (the same refresh token always gives the same pair, so a resent request gets
the same answer); the new refresh token keeps the expiry time of the one it replaces. A revoked access
token, and the refresh tokens issued with it, are refused afterwards (``INVALID_ACCESS_TOKEN``,
``INVALID_REFRESH_TOKEN``). Token lifetimes are settable (``authnotify dev`` makes them seconds).

Outcomes are scriptable per auth code, per operation (``code``, ``refresh``, ``revoke``) or for every request
(S, F with a code, U, an HTTP error status, a slow answer, a bad signature), for a number of calls or until
reset. Calls are counted per auth code, per refresh token and per revoked access token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import orjson
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from authnotify.alipay.client import (
    AMS_APPLY_TOKEN_PATH,
    AMS_REVOKE_PATH,
    AMS_SANDBOX_APPLY_TOKEN_PATH,
    AMS_SANDBOX_REVOKE_PATH,
    APS_APPLY_TOKEN_PATH,
    APS_CANCEL_TOKEN_PATH,
    SANDBOX_CLIENT_PREFIX,
)
from authnotify.alipay.signature import sign_request_headers, verify_signature_header
from authnotify.config.keys import ANY_KEY_VERSION, PublicKeyRing

OutcomeKind = Literal["S", "F", "U", "http_error", "slow", "bad_signature"]
Operation = Literal["code", "refresh", "revoke"]

ACCESS_TOKEN_LIFETIME = timedelta(days=30)
REFRESH_TOKEN_LIFETIME = timedelta(days=180)
_ALIPAY_OFFSET = timezone(timedelta(hours=8))  # Alipay writes its times in +08:00
_RESPONSE_CONTENT_TYPE = "application/json; charset=UTF-8"


@dataclass(frozen=True)
class Outcome:
    """What the gateway answers to a valid request."""

    kind: OutcomeKind
    result_code: str = "SUCCESS"
    http_status: int = 200
    delay_seconds: float = 0.0

    @classmethod
    def success(cls) -> Outcome:
        return cls("S")

    @classmethod
    def failure(cls, result_code: str = "INVALID_CODE") -> Outcome:
        return cls("F", result_code=result_code)

    @classmethod
    def unknown(cls, result_code: str = "UNKNOWN_EXCEPTION") -> Outcome:
        return cls("U", result_code=result_code)

    @classmethod
    def http_error(cls, status: int = 500) -> Outcome:
        return cls("http_error", result_code="UNKNOWN_EXCEPTION", http_status=status)

    @classmethod
    def slow(cls, seconds: float = 6.0) -> Outcome:
        """A correct S answer, but only after ``seconds`` (longer than the client's 5 s timeout)."""
        return cls("slow", delay_seconds=seconds)

    @classmethod
    def bad_signature(cls) -> Outcome:
        """A correct-looking S answer whose Signature does not match its body."""
        return cls("bad_signature")


@dataclass
class _Step:
    outcome: Outcome
    times: int | None  # None: until reset


@dataclass(frozen=True)
class GatewayCall:
    """One request that reached the gateway, answered or refused."""

    provider: str
    path: str
    client_id: str | None
    body: dict[str, Any] = field(repr=False)
    answered: str  # an OutcomeKind, or the refusal's resultCode

    @property
    def grant_type(self) -> str | None:
        value = self.body.get("grantType")
        return value if isinstance(value, str) else None

    @property
    def auth_code(self) -> str | None:
        value = self.body.get("authCode")
        return value if isinstance(value, str) else None

    @property
    def operation(self) -> Operation | None:
        if "grantType" in self.body:
            return "refresh" if self.grant_type == "REFRESH_TOKEN" else "code"
        return "revoke" if "accessToken" in self.body else None


@dataclass(frozen=True)
class _Route:
    provider: str
    sandbox: bool
    revoke: bool = False


_ROUTES = {
    AMS_APPLY_TOKEN_PATH: _Route("ams", sandbox=False),
    AMS_SANDBOX_APPLY_TOKEN_PATH: _Route("ams", sandbox=True),
    APS_APPLY_TOKEN_PATH: _Route("aps", sandbox=False),
    AMS_REVOKE_PATH: _Route("ams", sandbox=False, revoke=True),
    AMS_SANDBOX_REVOKE_PATH: _Route("ams", sandbox=True, revoke=True),
    APS_CANCEL_TOKEN_PATH: _Route("aps", sandbox=False, revoke=True),
}


class _Refusal(Exception):
    def __init__(self, http_status: int, result_code: str, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.result_code = result_code


class AlipayGateway:
    """The state of one fake gateway: keys, client ids, scripts and what it was asked."""

    def __init__(
        self,
        *,
        alipay_private_key: RSAPrivateKey,
        client_public_key: RSAPublicKey | PublicKeyRing,
        ams_client_id: str | None = None,
        aps_client_id: str | None = None,
        token_secret: bytes | None = None,
        key_version: str = "1",
        access_token_lifetime: timedelta = ACCESS_TOKEN_LIFETIME,
        refresh_token_lifetime: timedelta = REFRESH_TOKEN_LIFETIME,
    ) -> None:
        self._private_key = alipay_private_key
        self._client_keys = (
            client_public_key
            if isinstance(client_public_key, PublicKeyRing)
            else PublicKeyRing({ANY_KEY_VERSION: client_public_key})
        )
        self._client_ids = {"ams": ams_client_id, "aps": aps_client_id}
        self._secret = token_secret or os.urandom(32)
        self._key_version = key_version
        self.access_token_lifetime = access_token_lifetime
        self.refresh_token_lifetime = refresh_token_lifetime
        self._global_script: list[_Step] = []
        self._code_scripts: dict[str, list[_Step]] = {}
        self._operation_scripts: dict[str, list[_Step]] = {}
        self._issued_at: dict[tuple[str, str], datetime] = {}
        self._refresh_expiry: dict[str, datetime] = {}  # refresh tokens it issued -> their expiry
        self._refresh_of: dict[str, str] = {}  # access token it issued -> the refresh token issued with it
        self._revoked: set[str] = set()  # access tokens and refresh tokens no longer valid
        self.calls: Counter[str] = Counter()  # valid applyToken requests per auth code
        self.refresh_calls: Counter[str] = Counter()  # valid refresh requests per refresh token
        self.revoke_calls: Counter[str] = Counter()  # valid revoke/cancelToken requests per access token
        self.requests: list[GatewayCall] = []
        self._changed: asyncio.Condition | None = None

    # --- scripting ----------------------------------------------------------------------------

    def script(self, outcome: Outcome, *, auth_code: str | None = None, operation: Operation | None = None,
               times: int | None = None) -> None:
        """Answer ``outcome`` to the next ``times`` valid requests (for ``auth_code`` only, or ``operation``
        only, if given).

        Steps queue up in order; ``times=None`` means until :meth:`reset`. Per-code steps come first, then
        per-operation steps, then the steps for every request.
        """
        step = _Step(outcome, times)
        if auth_code is not None:
            self._code_scripts.setdefault(auth_code, []).append(step)
        elif operation is not None:
            self._operation_scripts.setdefault(operation, []).append(step)
        else:
            self._global_script.append(step)

    def reset(self) -> None:
        self._global_script.clear()
        self._code_scripts.clear()
        self._operation_scripts.clear()

    @staticmethod
    def _take(steps: list[_Step]) -> Outcome | None:
        while steps:
            step = steps[0]
            if step.times is None:
                return step.outcome
            if step.times > 0:
                step.times -= 1
                return step.outcome
            steps.pop(0)
        return None

    def _next_outcome(self, auth_code: str | None, operation: Operation) -> Outcome:
        if auth_code is not None and auth_code in self._code_scripts:
            outcome = self._take(self._code_scripts[auth_code])
            if outcome is not None:
                return outcome
        if operation in self._operation_scripts:
            outcome = self._take(self._operation_scripts[operation])
            if outcome is not None:
                return outcome
        return self._take(self._global_script) or Outcome.success()

    # --- what tests look at -------------------------------------------------------------------

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def wait_until(self, predicate: Callable[[AlipayGateway], bool], timeout: float = 10.0) -> None:
        """Waits for ``predicate(self)`` to hold, woken by each request; TimeoutError after ``timeout``."""
        condition = self._condition()
        async with condition:
            await asyncio.wait_for(condition.wait_for(lambda: predicate(self)), timeout)

    async def wait_for_calls(self, auth_code: str, count: int, timeout: float = 10.0) -> None:
        await self.wait_until(lambda g: g.calls[auth_code] >= count, timeout)

    def tokens_for(self, provider: str, auth_code: str) -> tuple[str, str]:
        """The (access, refresh) tokens this gateway issues for ``auth_code``: what S answers carry."""
        return self._derive(provider, "access", auth_code), self._derive(provider, "refresh", auth_code)

    def refreshed_tokens_for(self, provider: str, refresh_token: str) -> tuple[str, str]:
        """The (access, refresh) tokens this gateway issues for a refresh with ``refresh_token``."""
        seed = f"refreshed:{refresh_token}"
        return self._derive(provider, "access", seed), self._derive(provider, "refresh", seed)

    def revoked(self, access_token: str) -> bool:
        return access_token in self._revoked

    # --- serving ------------------------------------------------------------------------------

    def _derive(self, provider: str, purpose: str, value: str) -> str:
        digest = hmac.new(self._secret, f"{provider}|{purpose}|{value}".encode(), hashlib.sha256)
        return "2810" + digest.hexdigest()[:36]

    def _digits(self, provider: str, purpose: str, value: str, length: int) -> str:
        digest = hmac.new(self._secret, f"{provider}|{purpose}|{value}".encode(), hashlib.sha256).digest()
        return str(int.from_bytes(digest, "big"))[:length]

    def _success_body(self, provider: str, request_body: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(UTC).astimezone(_ALIPAY_OFFSET)
        if request_body.get("grantType") == "REFRESH_TOKEN":
            old_refresh_token = str(request_body["refreshToken"])
            seed = f"refreshed:{old_refresh_token}"
            access_token, refresh_token = self.refreshed_tokens_for(provider, old_refresh_token)
            issued = self._issued_at.setdefault((provider, seed), now)
            # The new refresh token lives as long as the one it replaces: a refresh never extends the authorization.
            refresh_expiry = self._refresh_expiry.get(old_refresh_token, issued + self.refresh_token_lifetime)
        else:
            seed = str(request_body["authCode"])
            access_token, refresh_token = self.tokens_for(provider, seed)
            issued = self._issued_at.setdefault((provider, seed), now)
            refresh_expiry = issued + self.refresh_token_lifetime
        self._refresh_expiry.setdefault(refresh_token, refresh_expiry)
        self._refresh_of.setdefault(access_token, refresh_token)
        customer_id = self._digits(provider, "customer", seed, 21)
        body: dict[str, Any] = {
            "result": {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"},
            "accessToken": access_token,
            "accessTokenExpiryTime": _alipay_time(min(issued + self.access_token_lifetime, refresh_expiry)),
            "refreshToken": refresh_token,
            "refreshTokenExpiryTime": _alipay_time(refresh_expiry),
            "userLoginId": f"62-****{self._digits(provider, 'login', seed, 4)}",
        }
        if provider == "ams":
            body["pspCustomerInfo"] = {
                "pspName": request_body.get("customerBelongsTo"),
                "pspCustomerId": customer_id,
            }
        else:
            body["customerId"] = customer_id
        return body

    def _refusal_of_refresh(self, refresh_token: str) -> Outcome | None:
        """An F for a refresh token it revoked or that expired; None when it may be used."""
        if refresh_token in self._revoked:
            return Outcome.failure("INVALID_REFRESH_TOKEN")
        expiry = self._refresh_expiry.get(refresh_token)
        if expiry is not None and expiry <= datetime.now(UTC):
            return Outcome.failure("EXPIRED_REFRESH_TOKEN")
        return None

    def _revoke(self, access_token: str) -> Outcome:
        if access_token in self._revoked:
            return Outcome.failure("INVALID_ACCESS_TOKEN")
        self._revoked.add(access_token)
        refresh_token = self._refresh_of.get(access_token)
        if refresh_token is not None:  # "the related refresh token cannot be used" after a revocation
            self._revoked.add(refresh_token)
        return Outcome.success()

    def _validate(self, route: _Route, request: web.Request, raw: bytes) -> dict[str, Any]:
        content_type = request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise _Refusal(415, "MEDIA_TYPE_NOT_ACCEPTABLE", "content type must be application/json")
        client_id = request.headers.get("Client-Id")
        expected = self._client_ids[route.provider]
        if not client_id or client_id != expected or (
            client_id.startswith(SANDBOX_CLIENT_PREFIX) != route.sandbox
        ):
            raise _Refusal(401, "INVALID_CLIENT", "the client is invalid")
        request_time = request.headers.get("Request-Time")
        if not request_time or not verify_signature_header(
            self._client_keys, request.headers.get("Signature"), method="POST", path=request.path,
            client_id=client_id, time=request_time, body=raw,
        ):
            raise _Refusal(401, "INVALID_SIGNATURE", "the signature is invalid")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Refusal(200, "PARAM_ILLEGAL", "body is not JSON") from None
        if not isinstance(body, dict):
            raise _Refusal(200, "PARAM_ILLEGAL", "body is not a JSON object")
        if route.revoke:
            required = {"accessToken": 128}
            if route.provider == "aps":
                required["authClientId"] = 64
            for name, max_length in required.items():
                value = body.get(name)
                if not isinstance(value, str) or not value or len(value) > max_length:
                    raise _Refusal(200, "PARAM_ILLEGAL", f"illegal {name}")
            return body
        grant_type = body.get("grantType")
        needed = {"AUTHORIZATION_CODE": "authCode", "REFRESH_TOKEN": "refreshToken"}.get(str(grant_type))
        if needed is None:
            raise _Refusal(200, "PARAM_ILLEGAL", "grantType must be AUTHORIZATION_CODE or REFRESH_TOKEN")
        required = {needed: 128}
        if route.provider == "ams":
            required["customerBelongsTo"] = 64
        else:
            required["authClientId"] = 64
        for name, max_length in required.items():
            value = body.get(name)
            if not isinstance(value, str) or not value or len(value) > max_length:
                raise _Refusal(200, "PARAM_ILLEGAL", f"illegal {name}")
        return body

    def _respond(self, path: str, client_id: str, status: int, body: dict[str, Any], *,
                 corrupt_signature: bool = False) -> web.Response:
        raw = orjson.dumps(body)
        # A bad signature: correctly formed, by the right key, over other bytes.
        signed = raw + b" " if corrupt_signature else raw
        headers = sign_request_headers(self._private_key, method="POST", path=path, client_id=client_id,
                                       body=signed, time_header="Response-Time",
                                       key_version=self._key_version)
        headers["Content-Type"] = _RESPONSE_CONTENT_TYPE
        return web.Response(status=status, body=raw, headers=headers)

    async def _record(self, call: GatewayCall, counted_code: str | None) -> None:
        async with self._condition():
            self.requests.append(call)
            if counted_code is not None:
                self.calls[counted_code] += 1
            self._condition().notify_all()

    async def handle_request(self, request: web.Request) -> web.StreamResponse:
        route = _ROUTES[request.path]
        raw = await request.read()
        client_id = request.headers.get("Client-Id") or ""
        try:
            body = self._validate(route, request, raw)
        except _Refusal as refusal:
            try:
                recorded_body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                recorded_body = {}
            await self._record(
                GatewayCall(route.provider, request.path, client_id or None,
                            recorded_body if isinstance(recorded_body, dict) else {}, refusal.result_code),
                None,
            )
            result = {"resultCode": refusal.result_code, "resultStatus": "F", "resultMessage": str(refusal)}
            return self._respond(request.path, client_id, refusal.http_status, {"result": result})

        operation: Operation = ("revoke" if route.revoke
                                else "refresh" if body.get("grantType") == "REFRESH_TOKEN" else "code")
        auth_code = body.get("authCode") if operation == "code" else None
        outcome = self._next_outcome(auth_code, operation)
        if operation == "refresh" and outcome.kind in ("S", "slow", "bad_signature"):
            outcome = self._refusal_of_refresh(str(body["refreshToken"])) or outcome
        if operation == "revoke" and outcome.kind in ("S", "slow", "bad_signature"):
            refused = self._revoke(str(body["accessToken"]))
            outcome = refused if refused.kind == "F" else outcome
        await self._record(GatewayCall(route.provider, request.path, client_id, body, outcome.kind), auth_code)
        async with self._condition():
            if operation == "refresh":
                self.refresh_calls[str(body["refreshToken"])] += 1
            elif operation == "revoke":
                self.revoke_calls[str(body["accessToken"])] += 1
            self._condition().notify_all()

        if outcome.kind == "http_error":
            return web.Response(status=outcome.http_status, text="Internal Server Error")
        if outcome.kind in ("F", "U"):
            result = {"resultCode": outcome.result_code, "resultStatus": outcome.kind,
                      "resultMessage": f"sandbox answered {outcome.result_code}"}
            return self._respond(request.path, client_id, 200, {"result": result})
        if outcome.kind == "slow":
            await asyncio.sleep(outcome.delay_seconds)
        answer = (self._revoke_body() if route.revoke else self._success_body(route.provider, body))
        return self._respond(request.path, client_id, 200, answer, corrupt_signature=outcome.kind == "bad_signature")

    @staticmethod
    def _revoke_body() -> dict[str, Any]:
        return {"result": {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"}}

    def app(self) -> web.Application:
        application = web.Application()
        for path in _ROUTES:
            application.router.add_post(path, self.handle_request)
        return application


def _alipay_time(moment: datetime) -> str:
    """As Alipay writes times: +08:00, whole seconds (rounded up, so a token never expires early)."""
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return moment.astimezone(_ALIPAY_OFFSET).isoformat()


@dataclass
class RunningAlipayGateway:
    gateway: AlipayGateway
    runner: web.AppRunner
    url: str  # base URL, e.g. http://127.0.0.1:40123: what AUTHNOTIFY_*_GATEWAY_URL takes

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def start_alipay_gateway(gateway: AlipayGateway, *, host: str = "127.0.0.1",
                               port: int = 0) -> RunningAlipayGateway:
    """Serves ``gateway`` on ``host:port`` (0: any free port) until ``aclose``."""
    # shutdown_timeout: a scripted slow answer must not hold up the test's teardown.
    runner = web.AppRunner(gateway.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    return RunningAlipayGateway(gateway=gateway, runner=runner, url=f"http://{host}:{bound_port}")
