"""Lifecycle commands: what the scheduler, the CLI and the API ask the workers to do to an authorization.

A command names the authorization by its id, never by a token; the worker reads the tokens from the store.

* :class:`RefreshRequest` (queue ``{ns}.token-refresh``): bring the authorization's tokens up to date. It
  names the access token it was made for: once that token is replaced, the request is done, so duplicates
  and redeliveries never refresh twice.
* :class:`RevokeCommand` (queue ``{ns}.revocations``): revoke the authorization at Alipay, then cancel it;
  its ``commandId`` is what ``authorizations revoke`` and the API return, and its outcome is recorded.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from authnotify.domain.authorizations import iso_utc

REASON_MAX_LENGTH = 256
COMMAND_ID_PREFIX = "cmd_"


def new_command_id() -> str:
    return COMMAND_ID_PREFIX + secrets.token_urlsafe(16)


def _now() -> str:
    return iso_utc(datetime.now(UTC)) or ""


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    authorizationId: str = Field(min_length=1, max_length=40)
    provider: Literal["ams", "aps"]
    requestedAt: str = Field(default_factory=_now)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


class RefreshRequest(_Command):
    accessTokenFingerprint: str = Field(min_length=16, max_length=16)  # the token to replace
    origin: Literal["scheduler", "on-demand"] = "scheduler"


class RevokeCommand(_Command):
    commandId: str = Field(default_factory=new_command_id, min_length=1, max_length=40)
    reason: str | None = Field(default=None, max_length=REASON_MAX_LENGTH)
