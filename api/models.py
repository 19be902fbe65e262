"""What the API answers and takes, as pydantic models: they are the OpenAPI document's schemas too."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from authnotify.domain.authorizations import AuthorizationData
from authnotify.domain.commands import REASON_MAX_LENGTH
from authnotify.domain.events import HistoryEntry
from authnotify.messaging.topology import Consumer
from authnotify.operations.deadletters import MAX_REPLAY_IDS, MERCHANT_MAX_LENGTH
from authnotify.operations.deadletters import REASON_MAX_LENGTH as FILTER_REASON_MAX_LENGTH


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


class DeadLetterItem(BaseModel):
    """One dead-lettered message, as ``authnotify dlq list --json`` prints it (the body is never shown)."""

    id: str = Field(description="what replay's ids take; stable while the message sits in the dead-letter queue")
    queue: str = Field(description="the consumer it died in")
    provider: str | None
    notifyType: str | None = Field(description="authorizationNotifyType, event type or command kind")
    attempts: int | None
    reason: str | None
    deadLetteredAt: str | None
    merchant: str | None = Field(description="its referenceMerchantId, else its authClientId; null when it names "
                                             "neither")


class DeadLetterList(BaseModel):
    items: list[DeadLetterItem] = Field(description="oldest first, queue by queue")
    more: bool = Field(description="more messages match than the limit let through (narrow the filters or raise the limit)")


class ReplayRequest(BaseModel):
    """``{"queue", "ids": [...]}`` or ``{"queue", "all": true}``; the filters narrow either."""

    model_config = ConfigDict(extra="forbid")

    queue: Consumer = Field(description="the consumer whose dead-letter queue to replay from")
    ids: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, min_length=1, max_length=MAX_REPLAY_IDS, description="the ids dlq list shows")
    all: bool | None = Field(default=None, description="true: every dead letter of the queue that matches the filters")
    merchant: str | None = Field(default=None, max_length=MERCHANT_MAX_LENGTH,
                                 description="only messages about this merchant")
    since: str | None = Field(default=None, max_length=64, description="only those dead-lettered at or after this "
                                                                       "ISO 8601 time (UTC without an offset)")
    reason: str | None = Field(default=None, max_length=FILTER_REASON_MAX_LENGTH,
                               description="only those whose reason contains this, in any case")

    @model_validator(mode="after")
    def _ids_or_all(self) -> ReplayRequest:
        if (self.ids is None) == (self.all is not True):
            raise ValueError('give either "ids" (a non-empty list) or "all": true')
        return self


class ReplayAnswer(BaseModel):
    replayed: int
    notFound: list[str] = Field(description="asked-for ids not (or no longer) in the dead-letter queue, or filtered out")


class QueueFigures(BaseModel):
    name: str
    consumer: str | None = Field(description="the consumer it belongs to; null for the unrouted queue")
    kind: Literal["consumer", "retry", "dead-letter", "unrouted"]
    ready: int | None = Field(description="messages waiting; null when the queue does not exist")
    unacknowledged: int | None = Field(description="messages a consumer holds; null when unknown (RabbitMQ's "
                                                   "Prometheus endpoint not reachable)")
    consumers: int | None


class QueueList(BaseModel):
    queues: list[QueueFigures]
