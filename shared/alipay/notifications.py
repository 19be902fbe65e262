"""Alipay's notifications: where each provider sends them, their types, and their field rules.

AMS ``notifyAuthorization`` and Alipay+ ``authNotify`` as pydantic models, one per provider and notification
type. Every field is a JSON string (Alipay requires strings even for numbers), maximum lengths are Alipay's,
and the fields a type needs are required on that type's model. Unknown fields are kept, not refused:
providers add fields.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from authnotify.errors import PermanentError

# The paths Alipay calls on the ingress, by provider (and signs: the path is part of the signed content).
NOTIFY_PATHS: dict[str, str] = {
    "ams": "/ams/notifyAuthorization",
    "aps": "/aps/api/v1/authorizations/authNotify",
}

# Alipay+ asks the ACQP, synchronously, whether the merchant lets the user unbind from the wallet side.
CONSULT_UNBINDING_PATH = "/aps/api/v1/authorizations/consultUnbinding"


def signed_path(path: str, prefix: str = "") -> str:
    """The path Alipay calls, and so signs, for one of ours: ``prefix`` (``AUTHNOTIFY_NOTIFY_PATH_PREFIX``,
    what a proxy in front of the ingress adds, e.g. ``/alipay``) then the path. The ingress verifies and signs
    over it whether or not the proxy strips the prefix before passing the request on."""
    return prefix + path

AUTHCODE_CREATED = "AUTHCODE_CREATED"
TOKEN_CREATED = "TOKEN_CREATED"
TOKEN_CANCELED = "TOKEN_CANCELED"
NOTIFY_TYPES: tuple[str, ...] = (AUTHCODE_CREATED, TOKEN_CREATED, TOKEN_CANCELED)


class InvalidNotification(PermanentError):
    """The body breaks a field rule; the message is the dead-letter reason (never a secret value)."""


# Strings with Alipay's maximum lengths.
String32 = Annotated[StrictStr, Field(max_length=32)]
String64 = Annotated[StrictStr, Field(max_length=64)]
String128 = Annotated[StrictStr, Field(max_length=128)]
String256 = Annotated[StrictStr, Field(max_length=256)]
String20000 = Annotated[StrictStr, Field(max_length=20000)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, str_strip_whitespace=False)


class Result(_Model):
    resultCode: String64
    resultStatus: Literal["S", "F", "U"]
    resultMessage: String256 | None = None


# --- AMS notifyAuthorization (Alipay's notifyAuthorization reference) -----------------------------


class AmsNotification(_Model):
    provider: Literal["ams"] = "ams"
    authorizationNotifyType: String32
    authClientId: String64 | None = None
    accessToken: String128 | None = None
    authState: String256 | None = None
    authCode: String64 | None = None
    reason: String256 | None = None
    result: Result
    userLoginId: String64 | None = None
    userId: String64 | None = None

    @field_validator("result")
    @classmethod
    def _successful(cls, result: Result) -> Result:
        # Alipay notifies only successful authorizations and cancellations.
        if result.resultStatus != "S":
            raise ValueError(f"result.resultStatus is {result.resultStatus}, not S")
        return result


class AmsAuthCodeCreated(AmsNotification):
    authorizationNotifyType: Literal["AUTHCODE_CREATED"]
    authCode: String64


class AmsTokenCreated(AmsNotification):
    authorizationNotifyType: Literal["TOKEN_CREATED"]
    accessToken: String128


class AmsTokenCanceled(AmsNotification):
    authorizationNotifyType: Literal["TOKEN_CANCELED"]
    accessToken: String128


# --- Alipay+ authNotify (Alipay+'s authNotify reference) -------------------------------------------


class WalletLogo(_Model):
    logoName: StrictStr | None = None
    logoUrl: StrictStr | None = None


class Wallet(_Model):
    walletName: StrictStr | None = None
    walletBrandName: StrictStr | None = None
    walletLogo: WalletLogo | None = None


class ApsNotification(_Model):
    provider: Literal["aps"] = "aps"
    authorizationNotifyType: String32
    authClientId: String64
    referenceMerchantId: String32
    accessToken: String128 | None = None
    authCode: String64 | None = None
    authState: String256 | None = None
    customerId: String64 | None = None
    userLoginId: String64 | None = None
    referenceAgreementId: String64 | None = None
    accessTokenExpiryTime: datetime | None = None
    refreshToken: String128 | None = None
    refreshTokenExpiryTime: datetime | None = None
    scopes: list[StrictStr] | None = None
    pspId: String64
    acquirerId: String64
    reason: String256 | None = None
    tokenCancelSource: Literal["ACQUIRER", "PSP"] | None = None
    passThroughInfo: String20000 | None = None
    walletForAccountBinding: Wallet | None = None

    @field_validator("accessTokenExpiryTime", "refreshTokenExpiryTime", mode="before")
    @classmethod
    def _iso_8601_string(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError("must be an ISO 8601 string")
        return value

    @field_validator("accessTokenExpiryTime", "refreshTokenExpiryTime")
    @classmethod
    def _with_offset(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a UTC offset, e.g. 2019-11-27T12:01:01+08:00")
        return value


class ApsAuthCodeCreated(ApsNotification):
    authorizationNotifyType: Literal["AUTHCODE_CREATED"]
    authCode: String64
    referenceAgreementId: String64


class ApsTokenCreated(ApsNotification):
    authorizationNotifyType: Literal["TOKEN_CREATED"]
    accessToken: String128
    referenceAgreementId: String64
    walletForAccountBinding: Wallet


class ApsTokenCanceled(ApsNotification):
    authorizationNotifyType: Literal["TOKEN_CANCELED"]
    accessToken: String128
    tokenCancelSource: Literal["ACQUIRER", "PSP"]


AuthCodeCreated = AmsAuthCodeCreated | ApsAuthCodeCreated
TokenCreated = AmsTokenCreated | ApsTokenCreated
TokenCanceled = AmsTokenCanceled | ApsTokenCanceled

MODELS: dict[tuple[str, str], type[_Model]] = {
    ("ams", "AUTHCODE_CREATED"): AmsAuthCodeCreated,
    ("ams", "TOKEN_CREATED"): AmsTokenCreated,
    ("ams", "TOKEN_CANCELED"): AmsTokenCanceled,
    ("aps", "AUTHCODE_CREATED"): ApsAuthCodeCreated,
    ("aps", "TOKEN_CREATED"): ApsTokenCreated,
    ("aps", "TOKEN_CANCELED"): ApsTokenCanceled,
}


def _describe(error: ValidationError) -> str:
    """The first broken rule, e.g. ``authCode: String should have at most 64 characters``.

    Pydantic's message never carries the input value here, so a too-long token is not echoed.
    """
    first = error.errors(include_input=False, include_url=False)[0]
    location = ".".join(str(part) for part in first.get("loc", ())) or "body"
    message = first.get("msg", "invalid")
    if first.get("type") == "missing":
        message = "required field is missing"
    more = len(error.errors()) - 1
    return f"{location}: {message}" + (f" (and {more} more)" if more else "")


def parse_notification(body: bytes, provider: str | None, notify_type: str) -> Any:
    """The validated model of a notification body, or :class:`InvalidNotification` with the reason."""
    model = MODELS.get((provider or "", notify_type))
    if model is None:
        raise InvalidNotification(f"no {notify_type} notification for provider {provider!r}")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidNotification("body is not JSON") from None
    if not isinstance(document, dict):
        raise InvalidNotification("body is not a JSON object")
    document.pop("provider", None)  # ours, not Alipay's: the ingress endpoint decides the provider
    if document.get("authorizationNotifyType") != notify_type:
        raise InvalidNotification(
            f"authorizationNotifyType is {str(document.get('authorizationNotifyType'))[:32]!r}, "
            f"this queue takes {notify_type}"
        )
    try:
        return model.model_validate({**document, "provider": provider})
    except ValidationError as exc:
        raise InvalidNotification(_describe(exc)) from None

