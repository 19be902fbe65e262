"""Finding, revoking and handing out authorizations: what ``authnotify authorizations`` and the API both do.

Revoking publishes a revocation command with confirms and returns its ``commandId``; the ``revocations``
worker does the rest and records the outcome. Handing out an access token that expires within 60 s first
asks for a refresh through the same queue and worker as the scheduler's requests (one refresh
implementation, with its claim, retries and event), and waits a few seconds for the new token.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from authnotify.domain.authorizations import STATUS_ACTIVE, AuthorizationData
from authnotify.domain.commands import REASON_MAX_LENGTH, RefreshRequest, RevokeCommand
from authnotify.errors import AuthnotifyError
from authnotify.messaging.publisher import Publisher
from authnotify.messaging.sending import send_command
from authnotify.messaging.topology import Topology
from authnotify.store.repository import AuthorizationStore, CommandOutcome, CurrentTokens

KEY_MAX_LENGTH = 128
REFRESH_WITHIN = timedelta(seconds=60)  # an access token closer to its expiry than this is refreshed first
REFRESH_WAIT_SECONDS = 10.0  # how long a caller waits for an on-demand refresh
POLL_SECONDS = 0.05


class OperationError(AuthnotifyError):
    """An operation that cannot be done as asked; the message is safe to show (never a token)."""


class NotFound(OperationError):
    pass


class NotActive(OperationError):
    def __init__(self, authorization: AuthorizationData) -> None:
        super().__init__(f"authorization {authorization.authorizationId} is {authorization.status}")
        self.authorization = authorization


class InvalidRequest(OperationError):
    pass


class RefreshPending(OperationError):
    """The access token was due for a refresh that did not finish in time; asking again later may succeed."""


# The names of an authorization that are safe to repeat anywhere: its id and token fingerprints.
_NAME = re.compile(r"^(auth_[A-Za-z0-9_-]{1,35}|[0-9a-f]{16})$")


def shown_key(key: str) -> str:
    """``key`` as it may be repeated in an answer, an error or a log line. An id or a fingerprint is shown as
    it is; anything else (an agreement id, or a raw access token pasted by mistake) only as the first 16 hex
    digits of its SHA-256, which for a token is its fingerprint."""
    if _NAME.match(key):
        return key
    return f"sha256:{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"


async def find_authorization(store: AuthorizationStore, key: str) -> AuthorizationData:
    """By authorizationId, any accessTokenFingerprint it held, or referenceAgreementId; :class:`NotFound`."""
    found = await store.get_authorization(key) if key and len(key) <= KEY_MAX_LENGTH else None
    if found is None:
        raise NotFound(f"no authorization matches the key given ({shown_key(key)}): a key is an authorizationId, "
                       "an access-token fingerprint or a referenceAgreementId")
    return found


async def revoke(store: AuthorizationStore, publisher: Publisher, topology: Topology, key: str,
                 reason: str | None) -> RevokeCommand:
    """Queues the revocation (confirmed by the broker) and returns it; its ``commandId`` names the outcome.

    A canceled or expired authorization is revoked too: the worker records that as a successful no-op.
    """
    if reason is not None and len(reason) > REASON_MAX_LENGTH:
        raise InvalidRequest(f"reason: at most {REASON_MAX_LENGTH} characters")
    authorization = await find_authorization(store, key)
    assert authorization.authorizationId is not None
    command = RevokeCommand(authorizationId=authorization.authorizationId, provider=authorization.provider,
                            reason=reason)
    await send_command(publisher, topology, command)
    return command


async def wait_for_command(store: AuthorizationStore, command_id: str, *, timeout: float) -> CommandOutcome | None:
    """The command's outcome once it has one (succeeded or failed); its latest record (or None) at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = await store.command(command_id)
        if (outcome is not None and outcome.status != "retrying") or time.monotonic() >= deadline:
            return outcome
        await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


@dataclass(frozen=True)
class AccessToken:
    authorization: AuthorizationData
    access_token: str = field(repr=False)
    access_token_expires_at: datetime | None
    refreshed: bool  # a refresh was asked for and obtained first


def _usable(tokens: CurrentTokens, now: datetime) -> bool:
    expires = tokens.access_token_expires_at
    return expires is None or expires - now > REFRESH_WITHIN


async def access_token(store: AuthorizationStore, publisher: Publisher, topology: Topology, key: str, *,
                       wait: float = REFRESH_WAIT_SECONDS) -> AccessToken:
    """The authorization's current access token; one expiring within 60 s is refreshed first.

    :class:`NotFound`, :class:`NotActive` (canceled or expired, also when the refresh expired it), or
    :class:`RefreshPending` when the refresh did not finish within ``wait`` seconds.
    """
    authorization = await find_authorization(store, key)
    assert authorization.authorizationId is not None
    tokens = await store.current_tokens(authorization.authorizationId)
    if tokens is None:
        raise NotFound(f"no tokens stored for authorization {authorization.authorizationId}")
    if tokens.authorization.status != STATUS_ACTIVE:
        raise NotActive(tokens.authorization)
    now = datetime.now(UTC)
    if _usable(tokens, now) or (tokens.refresh_token is None and not tokens.access_token_expired(now)):
        # Valid long enough, or nothing could replace it yet: it is the token there is.
        return AccessToken(tokens.authorization, tokens.access_token, tokens.access_token_expires_at, refreshed=False)

    data = tokens.authorization
    await send_command(publisher, topology, RefreshRequest(
        authorizationId=authorization.authorizationId, provider=data.provider,
        accessTokenFingerprint=data.accessTokenFingerprint, origin="on-demand"))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
        latest = await store.current_tokens(authorization.authorizationId)
        if latest is None:  # pragma: no cover - rows are never deleted
            raise NotFound(f"authorization {authorization.authorizationId} vanished")
        if latest.authorization.status != STATUS_ACTIVE:
            raise NotActive(latest.authorization)
        if latest.authorization.accessTokenFingerprint != data.accessTokenFingerprint:
            return AccessToken(latest.authorization, latest.access_token, latest.access_token_expires_at,
                               refreshed=True)
    raise RefreshPending(f"the access token of {authorization.authorizationId} expires within "
                         f"{REFRESH_WITHIN.total_seconds():.0f} s and its refresh did not finish within {wait:g} s")
