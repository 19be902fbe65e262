"""What the API answers and takes, as pydantic models: they are the OpenAPI document's schemas too."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from authnotify.domain.authorizations import AuthorizationData
from authnotify.domain.commands import REASON_MAX_LENGTH
from authnotify.domain.events import HistoryEntry


class AuthorizationPage(BaseModel):
    items: list[AuthorizationData]
    nextCursor: str | None = Field(description="pass as cursor for the next page; null on the last page")


class AuthorizationDetail(AuthorizationData):
    history: list[HistoryEntry] = Field(description="its events, oldest first, with their webhook-ids")


class AccessTokenAnswer(BaseModel):
    authorizationId: str
    accessToken: str
    accessTokenExpiryTime: str | None


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=REASON_MAX_LENGTH)


class RevokeAccepted(BaseModel):
    commandId: str


class CommandStatus(BaseModel):
    commandId: str
    kind: str
    authorizationId: str | None
    status: Literal["succeeded", "failed", "retrying"]
    detail: str | None
    attempts: int
    updatedAt: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str | None = None
