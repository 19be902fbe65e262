"""The client side of Alipay's ``applyToken``, for AMS and Alipay+ (docs/queues.md, docs/troubleshooting.md).

One :class:`AlipayClient` per configured provider, sharing the process's aiohttp session. It signs the
request with our private key and verifies the response's signature with Alipay's public keys before a
single byte of the body is trusted. Outcomes are typed:

* a verified answer, whatever its ``resultStatus`` (S, F or U), is an :class:`ApplyTokenResult`;
* anything that is not a verified answer (HTTP 5xx, timeout, connection error, a signature that does not
  verify, a garbled body) raises :class:`AlipayUnavailable`, which callers treat as "try again later".

Neither results' reprs, nor log lines, nor exception messages ever carry a token or an auth code.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import aiohttp
import orjson

from authnotify.alipay.signature import sign_request_headers, verify_signature_header
from authnotify.config import ENV_PREFIX, ProviderConfig
from authnotify.errors import ConfigError
from authnotify.observability.logging import get_logger
from authnotify.observability.metrics import APPLY_TOKEN_RESULTS, APPLY_TOKEN_SECONDS

log = get_logger("authnotify.alipay")

APPLY_TOKEN_TIMEOUT_SECONDS = 5.0  # Alipay's recommended client timeout
SANDBOX_CLIENT_PREFIX = "SANDBOX_"
JSON_CONTENT_TYPE = "application/json; charset=UTF-8"
# A token answer is a few hundred bytes; read all of it however it is chunked, but never more than this.
MAX_RESPONSE_BYTES = 1024 * 1024

AMS_APPLY_TOKEN_PATH = "/ams/api/v1/authorizations/applyToken"
AMS_SANDBOX_APPLY_TOKEN_PATH = "/ams/sandbox/api/v1/authorizations/applyToken"
APS_APPLY_TOKEN_PATH = "/aps/api/v1/authorizations/applyToken"

GrantType = Literal["AUTHORIZATION_CODE", "REFRESH_TOKEN"]
ResultStatus = Literal["S", "F", "U"]


class AlipayError(Exception):
    """Base of this module's errors; messages never carry a token or an auth code."""


class AlipayUnavailable(AlipayError):
    """No trustworthy answer: HTTP 5xx, timeout, connection error, bad signature or garbled body.

    ``kind`` is the metric label (http_error, timeout, connection_error, bad_signature, bad_response).
    The request may or may not have reached Alipay: resend the same parameters later.
    """

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def apply_token_path(provider: str, client_id: str) -> str:
    if provider == "ams":
        if client_id.startswith(SANDBOX_CLIENT_PREFIX):
            return AMS_SANDBOX_APPLY_TOKEN_PATH
        return AMS_APPLY_TOKEN_PATH
    if provider == "aps":
        return APS_APPLY_TOKEN_PATH
    raise ValueError(f"unknown provider {provider!r}")


@dataclass(frozen=True)
class ApplyTokenResult:
    """A verified applyToken answer. Tokens are set only when ``result_status`` is S."""

    provider: str
    result_status: ResultStatus
    result_code: str
    result_message: str | None = None
    access_token: str | None = field(default=None, repr=False)
    access_token_expiry_time: datetime | None = None
    refresh_token: str | None = field(default=None, repr=False)
    refresh_token_expiry_time: datetime | None = None
    user_login_id: str | None = None
    customer_id: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.result_status == "S"


class _Oversized(Exception):
    """The answer is longer than MAX_RESPONSE_BYTES."""


async def read_complete_body(response: aiohttp.ClientResponse, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """The whole body, however the server splits it over time (``content.read(n)`` returns only what is
    buffered so far), stopping with :class:`_Oversized` once it is longer than ``limit``."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _Oversized()
        chunks.append(chunk)
    return b"".join(chunks)


class _Garbled(Exception):
    """The verified body does not have the documented shape; the message names the field, not its value."""


def _optional_str(document: dict[str, Any], name: str) -> str | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Garbled(f"{name} is not a string")
    return value


def _optional_time(document: dict[str, Any], name: str) -> datetime | None:
    text = _optional_str(document, name)
    if text is None or not text.strip():
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _Garbled(f"{name} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise _Garbled(f"{name} has no UTC offset")
    return moment


def _customer_id(document: dict[str, Any]) -> str | None:
    # Alipay+ answers customerId; AMS nests the wallet's user id in pspCustomerInfo.
    direct = _optional_str(document, "customerId")
    if direct:
        return direct
    info = document.get("pspCustomerInfo")
    if isinstance(info, dict):
        nested = info.get("pspCustomerId")
        if isinstance(nested, str) and nested:
            return nested
    return None


def parse_apply_token_response(provider: str, body: bytes) -> ApplyTokenResult:
    """The typed result of a verified body; :class:`_Garbled` when it lacks the documented shape."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Garbled("body is not JSON") from None
    if not isinstance(document, dict):
        raise _Garbled("body is not a JSON object")
    result = document.get("result")
    if not isinstance(result, dict):
        raise _Garbled("result is missing")
    status = result.get("resultStatus")
    if status not in ("S", "F", "U"):
        raise _Garbled("result.resultStatus is not S, F or U")
    code = result.get("resultCode")
    if not isinstance(code, str) or not code:
        raise _Garbled("result.resultCode is missing")
    message = result.get("resultMessage")
    message = message[:256] if isinstance(message, str) else None
    if status != "S":
        return ApplyTokenResult(provider=provider, result_status=status, result_code=code[:64],
                                result_message=message)
    access_token = _optional_str(document, "accessToken")
    if not access_token:
        raise _Garbled("accessToken is missing from an S answer")
    return ApplyTokenResult(
        provider=provider,
        result_status="S",
        result_code=code[:64],
        result_message=message,
        access_token=access_token,
        access_token_expiry_time=_optional_time(document, "accessTokenExpiryTime"),
        refresh_token=_optional_str(document, "refreshToken") or None,
        refresh_token_expiry_time=_optional_time(document, "refreshTokenExpiryTime"),
        user_login_id=_optional_str(document, "userLoginId"),
        customer_id=_customer_id(document),
    )


class AlipayClient:
    """Signed calls to one provider's Alipay gateway. Cheap to build; holds no connection of its own."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession, *,
                 timeout: float = APPLY_TOKEN_TIMEOUT_SECONDS) -> None:
        if config.name == "ams" and not config.customer_belongs_to:
            raise ConfigError(
                f"{ENV_PREFIX}AMS_CUSTOMER_BELONGS_TO: required for applyToken when "
                f"{ENV_PREFIX}AMS_CLIENT_ID is set"
            )
        self._config = config
        self._session = session
        self._timeout = timeout

    @property
    def provider(self) -> str:
        return self._config.name

    @property
    def client_id(self) -> str:
        return self._config.client_id

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def apply_token_path(self) -> str:
        return apply_token_path(self._config.name, self._config.client_id)

    def _apply_token_body(self, grant_type: GrantType, credential_field: str, credential: str,
                          auth_client_id: str | None, reference_merchant_id: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"grantType": grant_type, credential_field: credential}
        if self._config.name == "ams":
            body["customerBelongsTo"] = self._config.customer_belongs_to
            return body
        if not auth_client_id:
            raise ValueError("Alipay+ applyToken needs authClientId")
        body["authClientId"] = auth_client_id
        if reference_merchant_id:
            body["referenceMerchantId"] = reference_merchant_id
        return body

    async def apply_token(
        self,
        *,
        auth_code: str | None = None,
        refresh_token: str | None = None,
        auth_client_id: str | None = None,
        reference_merchant_id: str | None = None,
    ) -> ApplyTokenResult:
        """grantType AUTHORIZATION_CODE when ``auth_code`` is given, REFRESH_TOKEN when ``refresh_token`` is.

        Alipay+ needs ``auth_client_id`` (the one used in prepare) and takes ``reference_merchant_id``;
        AMS sends the configured ``customerBelongsTo``. Raises :class:`AlipayUnavailable` when there is
        no verified answer.
        """
        if (auth_code is None) == (refresh_token is None):
            raise ValueError("give exactly one of auth_code and refresh_token")
        if auth_code is not None:
            body = self._apply_token_body("AUTHORIZATION_CODE", "authCode", auth_code,
                                          auth_client_id, reference_merchant_id)
        else:
            assert refresh_token is not None
            body = self._apply_token_body("REFRESH_TOKEN", "refreshToken", refresh_token,
                                          auth_client_id, reference_merchant_id)
        return await self._call(self.apply_token_path, orjson.dumps(body), operation="applyToken")

    async def _call(self, path: str, body: bytes, *, operation: str) -> ApplyTokenResult:
        provider = self._config.name
        started = time.perf_counter()
        try:
            result = await self._post(path, body, operation=operation)
        except AlipayUnavailable as exc:
            APPLY_TOKEN_RESULTS.labels(provider=provider, result=exc.kind).inc()
            log.warning("alipay_unavailable", operation=operation, provider=provider, kind=exc.kind,
                        error=str(exc), seconds=round(time.perf_counter() - started, 3))
            raise
        finally:
            APPLY_TOKEN_SECONDS.labels(provider=provider).observe(time.perf_counter() - started)
        APPLY_TOKEN_RESULTS.labels(provider=provider, result=result.result_status).inc()
        log.info("alipay_answered", operation=operation, provider=provider,
                 result_status=result.result_status, result_code=result.result_code,
                 seconds=round(time.perf_counter() - started, 3))
        return result

    async def _post(self, path: str, body: bytes, *, operation: str) -> ApplyTokenResult:
        config = self._config
        headers = sign_request_headers(config.private_key, method="POST", path=path,
                                       client_id=config.client_id, body=body)
        headers["Content-Type"] = JSON_CONTENT_TYPE
        url = config.gateway_url + path
        where = f"{operation} ({config.name})"
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.post(url, data=body, headers=headers, allow_redirects=False,
                                              timeout=aiohttp.ClientTimeout(total=None)) as response:
                    status = response.status
                    response_headers = response.headers
                    response_body = await read_complete_body(response)
        except _Oversized:
            raise AlipayUnavailable(f"{where} answered a body over {MAX_RESPONSE_BYTES // 1024} KiB",
                                    kind="bad_response") from None
        except TimeoutError:
            raise AlipayUnavailable(f"{where} timed out after {self._timeout:g}s", kind="timeout") from None
        except aiohttp.ClientError as exc:
            raise AlipayUnavailable(f"{where} connection error: {type(exc).__name__}",
                                    kind="connection_error") from None
        except OSError as exc:
            raise AlipayUnavailable(f"{where} connection error: {type(exc).__name__}",
                                    kind="connection_error") from None

        if status >= 500:
            raise AlipayUnavailable(f"{where} answered HTTP {status}", kind="http_error")

        # Alipay answers with the same Client-Id; one that differs is not an answer to us.
        answered_client_id = response_headers.get("Client-Id") or config.client_id
        response_time = response_headers.get("Response-Time")
        if answered_client_id != config.client_id or not response_time or not verify_signature_header(
            config.alipay_public_keys,
            response_headers.get("Signature"),
            method="POST",
            path=path,
            client_id=answered_client_id,
            time=response_time,
            body=response_body,
        ):
            raise AlipayUnavailable(
                f"{where} answer (HTTP {status}) has no valid Alipay signature", kind="bad_signature"
            )
        try:
            result = parse_apply_token_response(config.name, response_body)
        except _Garbled as exc:
            raise AlipayUnavailable(f"{where} answer (HTTP {status}) is garbled: {exc}",
                                    kind="bad_response") from None
        if result.succeeded and status != 200:
            raise AlipayUnavailable(f"{where} answered S with HTTP {status}", kind="bad_response")
        return result
