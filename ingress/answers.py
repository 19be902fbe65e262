"""What the ingress answers Alipay: the result codes (docs/ingress.md) and our signed answer headers.

Every answer has the body ``{"result":{"resultCode":..,"resultStatus":..,"resultMessage":..}}``. Answers are
signed like Alipay signs its requests (Alipay+ requires it for the SUCCESS answer; AMS accepts it). An RSA
signature costs about 1 ms, so a signed answer is computed once per path, outcome and Response-Time second
and then served from a cache: the hot path signs about once a second per endpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from authnotify.alipay.signature import sign_request_headers, signature_time

JSON_ANSWER_CONTENT_TYPE = "application/json; charset=UTF-8"


@dataclass(frozen=True)
class Outcome:
    """One answer of the status table: the HTTP status and the result object Alipay reads."""

    code: str
    status: Literal["S", "F", "U"]
    http_status: int
    message: str
    body: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        result = {"resultCode": self.code, "resultStatus": self.status, "resultMessage": self.message}
        object.__setattr__(self, "body", orjson.dumps({"result": result}))


# resultMessage texts as Alipay+'s authNotify result code table words them; SUCCESS answers "success".
SUCCESS = Outcome("SUCCESS", "S", 200, "success")
INVALID_SIGNATURE = Outcome("INVALID_SIGNATURE", "F", 401, "The signature is invalid.")
INVALID_CLIENT = Outcome("INVALID_CLIENT", "F", 401, "The client is invalid.")
METHOD_NOT_SUPPORTED = Outcome(
    "METHOD_NOT_SUPPORTED", "F", 405, "The server does not implement the requested HTTPS method."
)
MEDIA_TYPE_NOT_ACCEPTABLE = Outcome(
    "MEDIA_TYPE_NOT_ACCEPTABLE",
    "F",
    415,
    "The server does not implement the media type that is acceptable to the client.",
)
PARAM_ILLEGAL = Outcome("PARAM_ILLEGAL", "F", 413, "Illegal parameters: the body exceeds 64 KiB.")
UNKNOWN_EXCEPTION = Outcome(
    "UNKNOWN_EXCEPTION", "U", 503, "An API call failed, which is caused by unknown reasons."
)
# A body that does not arrive within AUTHNOTIFY_INGRESS_BODY_TIMEOUT: not refused for what it says, only
# not received, so U (Alipay retries) with the standard HTTP status for it; same body as UNKNOWN_EXCEPTION.
BODY_TIMEOUT = Outcome("UNKNOWN_EXCEPTION", "U", 408, UNKNOWN_EXCEPTION.message)
REQUEST_TRAFFIC_EXCEED_LIMIT = Outcome(
    "REQUEST_TRAFFIC_EXCEED_LIMIT", "U", 429, "The request traffic exceeds the limit."
)
# A provider whose client id is not configured has no endpoint: it is off (docs/configuration.md).
NO_INTERFACE_DEF = Outcome("NO_INTERFACE_DEF", "F", 404, "API is not defined.")


class AnswerSigner:
    """Signed answer headers for one provider's endpoint, cached per (path, outcome, second)."""

    def __init__(self, client_id: str, private_key: RSAPrivateKey) -> None:
        self._client_id = client_id
        self._private_key = private_key
        self._cache: dict[tuple[str, str], tuple[int, dict[str, str]]] = {}

    def headers(self, path: str, outcome: Outcome) -> dict[str, str]:
        """Client-Id, Response-Time, Signature and Content-Type; callers must not modify the dict."""
        second = int(time.time())
        key = (path, outcome.code)
        cached = self._cache.get(key)
        if cached is not None and cached[0] == second:
            return cached[1]
        headers = sign_request_headers(
            self._private_key,
            method="POST",
            path=path,
            client_id=self._client_id,
            body=outcome.body,
            time=signature_time(datetime.fromtimestamp(second, UTC)),
            time_header="Response-Time",
        )
        headers["Content-Type"] = JSON_ANSWER_CONTENT_TYPE
        self._cache[key] = (second, headers)
        return headers


UNSIGNED_HEADERS: dict[str, str] = {"Content-Type": JSON_ANSWER_CONTENT_TYPE}
