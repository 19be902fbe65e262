"""The ``revocations`` consumer: revokes an authorization at Alipay, then cancels it and tells the merchant.

AMS ``revoke`` with ``{"accessToken"}``, Alipay+ ``cancelToken`` with ``{"accessToken", "authClientId"}``,
signed like ``applyToken``, the answer's signature verified. S, or a signed F whose code says the token is
already invalid, cancels the authorization and emits ``authorization.canceled`` with ``tokenCancelSource``
``MERCHANT`` (AMS) or ``ACQUIRER`` (Alipay+) and the command's reason. U, timeouts and 5xx are retried (the
call is idempotent on the access token); any other F is dead-lettered with its code. Revoking an
authorization that is already canceled or expired is a successful no-op.

Each attempt's outcome is recorded under the command's id, for ``authorizations revoke --wait`` and the
API: succeeded, failed (dead-lettered), or retrying.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from authnotify.alipay.client import AlipayClient, AlipayUnavailable
from authnotify.config import ENV_PREFIX
from authnotify.domain.authorizations import STATUS_ACTIVE
from authnotify.domain.commands import RevokeCommand
from authnotify.domain.events import MerchantEvent, cancellation_events
from authnotify.errors import PermanentError, TransientError
from authnotify.messaging.consumer import ConsumerSpec, MessageContext, failure_reason, json_model_parser
from authnotify.messaging.topology import Consumer, build_topology
from authnotify.observability.logging import annotate
from authnotify.observability.metrics import REVOCATIONS
from authnotify.store import AuthorizationStore
from authnotify.store.repository import CommandOutcome
from authnotify.workers.resources import Resources

# Who canceled, as the merchant event says it: we did, on the merchant's behalf (AMS) or as the ACQP (Alipay+).
CANCEL_SOURCE = {"ams": "MERCHANT", "aps": "ACQUIRER"}
# Codes of an F answer that mean the token was already invalid: the revocation has nothing left to do.
ALREADY_INVALID_CODES = frozenset({"INVALID_ACCESS_TOKEN", "EXPIRED_ACCESS_TOKEN", "ACCESS_TOKEN_EXPIRED",
                                   "INVALID_TOKEN", "TOKEN_NOT_EXIST"})


def _count(provider: str, outcome: str) -> None:
    REVOCATIONS.labels(provider=provider, outcome=outcome).inc()


async def _revoke(command: RevokeCommand, context: MessageContext, *, store: AuthorizationStore,
                  alipay_clients: Mapping[str, AlipayClient]) -> tuple[list[MerchantEvent], str]:
    """The events to emit and what happened (canceled, already_invalid, no_op)."""
    authorization_id = command.authorizationId
    source = CANCEL_SOURCE[command.provider]
    tokens = await store.current_tokens(authorization_id)
    if tokens is None:
        raise PermanentError(f"no authorization {authorization_id}")
    data = tokens.authorization
    if data.status != STATUS_ACTIVE:
        # Nothing to revoke. This command may have canceled it and died before its event went out: the same
        # event again (a cancellation of a canceled authorization changes nothing).
        transition = await store.cancel_authorization(authorization_id, source=source, reason=command.reason)
        return cancellation_events(transition, possibly_seen_before=context.possibly_seen_before), "no_op"
    client = alipay_clients.get(data.provider)
    if client is None:
        raise PermanentError(f"{data.provider} is not configured ({ENV_PREFIX}{data.provider.upper()}_CLIENT_ID is "
                             "not set): cannot revoke")
    if data.provider == "aps" and not data.authClientId:
        raise PermanentError("the authorization has no authClientId, which Alipay+ cancelToken needs")
    operation = "revoke" if data.provider == "ams" else "cancelToken"
    try:
        result = await client.revoke_token(access_token=tokens.access_token, auth_client_id=data.authClientId)
    except AlipayUnavailable as exc:
        raise TransientError(str(exc)) from None
    if result.result_status == "U":
        raise TransientError(f"{operation} answered U {result.result_code}")
    outcome = "canceled"
    if result.result_status == "F":
        if result.result_code not in ALREADY_INVALID_CODES:
            raise PermanentError(f"{operation} answered F {result.result_code}")
        outcome = "already_invalid"
    transition = await store.cancel_authorization(authorization_id, source=source, reason=command.reason)
    return cancellation_events(transition, possibly_seen_before=context.possibly_seen_before), outcome


async def handle_revoke_command(
    command: RevokeCommand,
    context: MessageContext,
    *,
    store: AuthorizationStore,
    alipay_clients: Mapping[str, AlipayClient],
    max_attempts: int,
) -> list[MerchantEvent]:
    annotate(command_id=command.commandId, authorization_id=command.authorizationId)

    async def record(status: str, detail: str | None) -> None:
        await store.record_command(CommandOutcome(
            command_id=command.commandId, kind="revoke", authorization_id=command.authorizationId,
            status=status, detail=detail, attempts=context.attempt, updated_at=datetime.now(UTC),  # type: ignore[arg-type]
        ))

    try:
        events, outcome = await _revoke(command, context, store=store, alipay_clients=alipay_clients)
    except PermanentError as exc:
        _count(command.provider, "failed")
        await record("failed", failure_reason(exc, b""))
        raise
    except Exception as exc:
        last = context.attempt >= max_attempts
        _count(command.provider, "failed" if last else "retried")
        await record("failed" if last else "retrying", failure_reason(exc, b""))
        raise
    _count(command.provider, outcome)
    annotate(outcome=outcome, emitted=[event.type for event in events])
    await record("succeeded", outcome.replace("_", " "))
    return events


parse_revoke_command = json_model_parser(RevokeCommand, "a revoke command")


async def consumer(resources: Resources) -> ConsumerSpec:
    clients = await resources.alipay_clients()
    store = await resources.store()
    max_attempts = build_topology(resources.settings).max_attempts(Consumer.REVOCATIONS)

    async def handle(command: RevokeCommand, context: MessageContext) -> list[MerchantEvent]:
        return await handle_revoke_command(command, context, store=store, alipay_clients=clients,
                                           max_attempts=max_attempts)

    return ConsumerSpec(consumer=Consumer.REVOCATIONS, parse=parse_revoke_command, handle=handle)
