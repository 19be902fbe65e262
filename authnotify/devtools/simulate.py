"""``authnotify simulate``: plays Alipay against a running ingress (docs/commands.md).

It sends notifications signed as Alipay signs them (RSA256 over ``POST <path>\\n<Client-Id>.<Request-Time>.<body>``)
with the simulated Alipay's private key from ``.authnotify/`` (made by ``authnotify dev``) or a key given by
option or environment, checks every answer (HTTP status, ``resultStatus``/``resultCode``, and our signature on
SUCCESS answers, with our public key), and prints a summary. It exits non-zero when any notification was not
acknowledged with a correctly signed S answer.

Scenarios (``--provider`` chooses AMS, Alipay+ or both; ``--count`` repeats per provider):

* ``lifecycle``: an authorization's whole life, in under a minute against ``authnotify dev`` (whose gateway
  hands out tokens that live seconds): AUTHCODE_CREATED (the worker exchanges the code: activation), then the
  scheduler's refreshes, the expiry warning and the expiry; and TOKEN_CREATED (activation), then a revocation
  through the dev internal API (canceled by us). It watches the dev merchant endpoint until every event has
  arrived and prints each authorization's events. The auth-code flow's access token is the one the simulated
  gateway issues for the code (derived from the dev gateway secret); the token flow's is chosen here. Without
  the dev API it cancels the token flow with TOKEN_CANCELED instead; without the dev merchant endpoint it
  waits ``--gap`` seconds and cannot check the events.
* ``authcode-created``, ``token-created``, ``token-canceled``: one type.
* ``duplicates``: the same notification ``--repeat`` times (fresh Request-Time and signature each time).
* ``retry-pattern``: the same notification on Alipay's retry schedule (0s, 2min, 10min, 10min, 1h, 2h, 6h,
  15h), divided by ``--time-scale``; ``--stop-on-success`` stops at the first S as Alipay does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from authnotify.alipay.notifications import NOTIFY_PATHS, NOTIFY_TYPES
from authnotify.config import DevSettings, SimulateSettings, load
from authnotify.config.values import non_negative_float, positive_float, positive_int
from authnotify.devtools.devkeys import DEFAULT_DEV_DIR
from authnotify.errors import EXIT_FAILURE, EXIT_OK, CommandError, ConfigError

RETRY_SCHEDULE_SECONDS = (0.0, 120.0, 600.0, 600.0, 3600.0, 7200.0, 21600.0, 54000.0)  # Alipay's retry schedule
SCENARIOS = ("lifecycle", "authcode-created", "token-created", "token-canceled", "duplicates", "retry-pattern")
DEFAULT_URL = "http://127.0.0.1:8080"
ACTIVATION_WAIT_SECONDS = 30.0
LIFECYCLE_WAIT_SECONDS = 90.0  # the dev gateway's refresh tokens live 30 s: expiry comes well within this
# What each flow of the lifecycle goes through, as merchant events.
CODE_FLOW_EVENTS: tuple[str, ...] = ("authorization.activated", "authorization.refreshed", "authorization.expiring",
                    "authorization.expired")
TOKEN_FLOW_EVENTS: tuple[str, ...] = ("authorization.activated", "authorization.canceled")
_ALIPAY_OFFSET = timezone(timedelta(hours=8))

# The merchant ids of Alipay+'s authNotify samples: auth client and reference merchant.
APS_AUTH_CLIENT_ID = "218823863726123456789"
APS_REFERENCE_MERCHANT_ID = "218823863726123456780"
APS_ACQUIRER_ID = "1021234567891230001"
APS_PSP_ID = "1021234567891230002"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="?", default="lifecycle", choices=SCENARIOS,
                        help="what to send (default: lifecycle)")
    parser.add_argument("--url", help="the ingress base URL (default: $AUTHNOTIFY_SIMULATE_URL, else the "
                                      f"running `authnotify dev`'s, else {DEFAULT_URL})")
    parser.add_argument("--provider", choices=("ams", "aps", "both"), default="both",
                        help="whose notifications to send: ams, aps or both (default both)")
    parser.add_argument("--count", type=positive_int, default=1,
                        help="notifications (lifecycles) per provider (default 1)")
    parser.add_argument("--rate", type=non_negative_float, default=0.0,
                        help="at most this many notifications a second (default 0: as fast as allowed)")
    parser.add_argument("--concurrency", type=positive_int, default=32,
                        help="requests in flight at once (default 32)")
    parser.add_argument("--type", dest="notify_type", choices=NOTIFY_TYPES, default="TOKEN_CREATED",
                        help="the notification duplicates and retry-pattern send (default TOKEN_CREATED)")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="duplicates: sends of each notification (default 3)")
    parser.add_argument("--time-scale", type=positive_float, default=3600.0,
                        help="retry-pattern: divide Alipay's schedule by this (default 3600: 1h -> 1s)")
    parser.add_argument("--stop-on-success", action="store_true",
                        help="retry-pattern: stop resending at the first S answer, as Alipay does")
    parser.add_argument("--gap", type=non_negative_float, default=1.0,
                        help="lifecycle: seconds before the cancellations when no dev merchant endpoint "
                             "can be watched (default 1)")
    parser.add_argument("--request-time", choices=("iso", "epoch", "alternate"), default="alternate",
                        help="Request-Time form: ISO 8601, epoch milliseconds, or both in turn (default)")
    parser.add_argument("--key-version", default="1", help="keyVersion in the Signature header (default 1)")
    parser.add_argument("--timeout", type=positive_float, default=10.0,
                        help="seconds to wait for each answer (default 10)")
    parser.add_argument("--dev-dir", type=Path,
                        help="where `authnotify dev` keeps its keys (default: $AUTHNOTIFY_DEV_DIR, else "
                             f"{DEFAULT_DEV_DIR})")
    parser.add_argument("--ams-client-id", help="Client-Id for AMS (default: $AUTHNOTIFY_AMS_CLIENT_ID, else dev's)")
    parser.add_argument("--aps-client-id", help="Client-Id for Alipay+ (default: $AUTHNOTIFY_APS_CLIENT_ID, else dev's)")
    parser.add_argument("--alipay-private-key", metavar="KEY",
                        help="the key notifications are signed with: PEM, base64 or @file "
                             "(default: $AUTHNOTIFY_SIMULATE_ALIPAY_PRIVATE_KEY, else dev's)")
    parser.add_argument("--public-key", metavar="KEY",
                        help="our public key, to verify the answers' signatures "
                             "(default: $AUTHNOTIFY_SIMULATE_PUBLIC_KEY, else dev's)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON document (default: a table)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: one on a terminal)")


# --- what is sent ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    provider: str
    notify_type: str
    body: bytes

    @property
    def path(self) -> str:
        return NOTIFY_PATHS[self.provider]


@dataclass
class Authorization:
    """One simulated authorization: what its notifications carry."""

    provider: str
    serial: str
    access_token: str
    auth_code: str | None = None


class NotificationFactory:
    """Bodies shaped like Alipay's documented samples, with values unique to this run."""

    def __init__(self, tokens_for_code: Callable[[str, str], str] | None) -> None:
        self.run_id = secrets.token_hex(4).upper()
        self._counter = 0
        self.tokens_for_code = tokens_for_code

    def _serial(self) -> str:
        self._counter += 1
        return f"{self.run_id}{self._counter:08d}"

    @staticmethod
    def _dump(document: dict[str, Any]) -> bytes:
        return json.dumps(document, separators=(",", ":")).encode()

    def authorization(self, provider: str, *, from_auth_code: bool) -> Authorization:
        serial = self._serial()
        if from_auth_code:
            auth_code = f"2810{provider.upper()}{serial}{secrets.token_hex(6).upper()}"
            token = self.tokens_for_code(provider, auth_code) if self.tokens_for_code else ""
            return Authorization(provider, serial, token, auth_code)
        return Authorization(provider, serial, f"28100103_{serial}{secrets.token_hex(8)}")

    def _aps_common(self, notify_type: str) -> dict[str, Any]:
        return {"authorizationNotifyType": notify_type, "authClientId": APS_AUTH_CLIENT_ID,
                "referenceMerchantId": APS_REFERENCE_MERCHANT_ID}

    @staticmethod
    def _ams_result() -> dict[str, str]:
        return {"resultCode": "SUCCESS", "resultStatus": "S", "resultMessage": "success"}

    def auth_code_created(self, auth: Authorization) -> Notification:
        assert auth.auth_code is not None
        auth_state = str(uuid.uuid4()).upper()
        if auth.provider == "ams":
            document: dict[str, Any] = {
                "authorizationNotifyType": "AUTHCODE_CREATED", "authCode": auth.auth_code,
                "authState": auth_state, "result": self._ams_result(),
            }
        else:
            document = {**self._aps_common("AUTHCODE_CREATED"), "authCode": auth.auth_code,
                        "authState": auth_state, "referenceAgreementId": f"agr{auth.serial}",
                        "acquirerId": APS_ACQUIRER_ID, "pspId": APS_PSP_ID}
        return Notification(auth.provider, "AUTHCODE_CREATED", self._dump(document))

    def token_created(self, auth: Authorization, *, lifetime_seconds: tuple[float, float] | None = None) -> Notification:
        """``lifetime_seconds``: (access, refresh) token lifetimes to announce (Alipay+ only); default 30 and 180 days."""
        login = f"62-****{auth.serial[-4:]}"
        if auth.provider == "ams":
            document: dict[str, Any] = {
                "authorizationNotifyType": "TOKEN_CREATED", "accessToken": auth.access_token,
                "authState": str(uuid.uuid4()).upper(), "userLoginId": login,
                "userId": f"2088{auth.serial[-12:]}", "result": self._ams_result(),
            }
        else:
            now = datetime.now(UTC).replace(microsecond=0).astimezone(_ALIPAY_OFFSET)
            access_life, refresh_life = ((timedelta(seconds=lifetime_seconds[0]), timedelta(seconds=lifetime_seconds[1]))
                                         if lifetime_seconds else (timedelta(days=30), timedelta(days=180)))
            document = {
                **self._aps_common("TOKEN_CREATED"), "referenceAgreementId": f"agr{auth.serial}",
                "accessToken": auth.access_token,
                "accessTokenExpiryTime": (now + access_life).isoformat(),
                "refreshToken": f"28100334{auth.serial}{secrets.token_hex(8).upper()}",
                "refreshTokenExpiryTime": (now + refresh_life).isoformat(),
                "scopes": ["AGREEMENT_PAY", "USER_LOGIN_ID"],
                "customerId": f"2789808912345678{auth.serial[-11:]}", "userLoginId": login,
                "acquirerId": APS_ACQUIRER_ID, "pspId": APS_PSP_ID,
                "walletForAccountBinding": {
                    "walletName": "AlipayCN", "walletBrandName": "AlipayCN",
                    "walletLogo": {"logoName": "AlipayCN",
                                   "logoUrl": "https://www.alipayplus.com/logo/alipaycn.png"},
                },
            }
        return Notification(auth.provider, "TOKEN_CREATED", self._dump(document))

    def token_canceled(self, auth: Authorization) -> Notification:
        if auth.provider == "ams":
            document: dict[str, Any] = {
                "authorizationNotifyType": "TOKEN_CANCELED", "accessToken": auth.access_token,
                "reason": "The user canceled the authorization in the wallet", "result": self._ams_result(),
            }
        else:
            document = {**self._aps_common("TOKEN_CANCELED"), "accessToken": auth.access_token,
                        "tokenCancelSource": "PSP", "reason": "The user unbound the account in the wallet",
                        "acquirerId": APS_ACQUIRER_ID, "pspId": APS_PSP_ID}
        return Notification(auth.provider, "TOKEN_CANCELED", self._dump(document))

    def of_type(self, notify_type: str, auth: Authorization) -> Notification:
        return {"AUTHCODE_CREATED": self.auth_code_created, "TOKEN_CREATED": self.token_created,
                "TOKEN_CANCELED": self.token_canceled}[notify_type](auth)


# --- the keys and ids to play Alipay with ---------------------------------------------------------


@dataclass
class Identity:
    url: str
    client_ids: dict[str, str]
    alipay_private_key: Any
    our_public_keys: Any  # a PublicKeyRing, or None: answers' signatures are not checked
    tokens_for_code: Callable[[str, str], str] | None
    merchant_events_url: str | None
    api_url: str | None = None
    api_key: str | None = field(default=None, repr=False)


def resolve_identity(args: argparse.Namespace, providers: list[str]) -> Identity:
    from authnotify.config.keys import (
        ANY_KEY_VERSION,
        InvalidKeyError,
        PublicKeyRing,
        load_private_key,
        load_public_key_ring,
    )
    from authnotify.devtools.devkeys import load_dev_keys, read_dev_description

    try:
        env = load(SimulateSettings)
        if args.dev_dir is None:
            args.dev_dir = load(DevSettings).dev_dir
    except ConfigError as exc:
        raise CommandError(f"authnotify simulate: configuration: {exc}") from None
    try:
        dev_keys = load_dev_keys(args.dev_dir)
        described = read_dev_description(args.dev_dir) or {}
    except ConfigError as exc:
        raise CommandError(f"authnotify simulate: {exc}") from None

    url = (args.url or env.simulate_url or described.get("ingress_url") or DEFAULT_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CommandError(f"authnotify simulate: --url {url!r} is not an http(s) URL")

    client_ids: dict[str, str] = {}
    for provider in providers:
        client_id = (getattr(args, f"{provider}_client_id") or getattr(env, f"{provider}_client_id")
                     or (described.get("client_ids") or {}).get(provider))
        if not client_id:
            raise CommandError(
                f"authnotify simulate: no {provider.upper()} Client-Id: pass --{provider}-client-id, set "
                f"AUTHNOTIFY_{provider.upper()}_CLIENT_ID, or start `authnotify dev` here first")
        client_ids[provider] = client_id

    private_value = args.alipay_private_key or (
        env.simulate_alipay_private_key.get_secret_value() if env.simulate_alipay_private_key else None)
    if private_value:
        try:
            alipay_key = load_private_key(private_value)
        except InvalidKeyError as exc:
            raise CommandError(f"authnotify simulate: Alipay private key: {exc}") from None
    elif dev_keys is not None:
        alipay_key = dev_keys.alipay_private_key
    else:
        raise CommandError(
            f"authnotify simulate: no key to sign notifications with: no {args.dev_dir}/ here (start "
            "`authnotify dev` in this directory first) and no --alipay-private-key")

    public_value = args.public_key or env.simulate_public_key
    public_keys: Any = None
    if public_value:
        try:
            public_keys = load_public_key_ring(public_value)
        except InvalidKeyError as exc:
            raise CommandError(f"authnotify simulate: our public key: {exc}") from None
    elif dev_keys is not None:
        public_keys = PublicKeyRing({ANY_KEY_VERSION: dev_keys.our_public_key})

    tokens_for_code: Callable[[str, str], str] | None = None
    if dev_keys is not None:
        from authnotify.devtools.sandbox.alipay_gateway import AlipayGateway

        # Only to compute which access token the dev gateway issues for a code: nothing is served.
        gateway = AlipayGateway(alipay_private_key=dev_keys.alipay_private_key,
                                client_public_key=dev_keys.our_public_key,
                                token_secret=dev_keys.gateway_secret)
        tokens_for_code = lambda provider, code: gateway.tokens_for(provider, code)[0]  # noqa: E731
    ours = not args.url or args.url.rstrip("/") == described.get("ingress_url")
    return Identity(url, client_ids, alipay_key, public_keys, tokens_for_code,
                    described.get("merchant_events_url") if ours else None,
                    described.get("api_url") if ours and dev_keys is not None else None,
                    dev_keys.api_key if ours and dev_keys is not None else None)


# --- sending and counting -------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    provider: str
    notify_type: str
    http_status: int | None  # None: no HTTP answer
    result_status: str  # S, F, U, or "-" when none could be read
    result_code: str  # or the error when there was no answer
    latency_seconds: float
    signature: str  # "verified", "bad", "unchecked", "n/a" (not a SUCCESS answer)

    @property
    def acknowledged(self) -> bool:
        return self.http_status == 200 and self.result_status == "S" and self.signature != "bad"


@dataclass
class Tally:
    answers: list[Answer] = field(default_factory=list)

    def add(self, answer: Answer) -> None:
        self.answers.append(answer)


class Sender:
    def __init__(self, identity: Identity, args: argparse.Namespace, session: Any, tally: Tally,
                 advance: Callable[[int], None]) -> None:
        self._identity = identity
        self._args = args
        self._session = session
        self._tally = tally
        self._advance = advance
        self._sent = 0
        self._semaphore = asyncio.Semaphore(args.concurrency)

    def _request_time(self) -> str:
        form = self._args.request_time
        if form == "alternate":
            form = "iso" if self._sent % 2 == 0 else "epoch"
        if form == "epoch":
            return str(int(time.time() * 1000))
        return datetime.now(UTC).astimezone(_ALIPAY_OFFSET).replace(microsecond=0).isoformat()

    async def send(self, notification: Notification) -> Answer:
        import aiohttp

        from authnotify.alipay.signature import sign_request_headers, verify_signature_header

        async with self._semaphore:
            client_id = self._identity.client_ids[notification.provider]
            request_time = self._request_time()
            self._sent += 1
            headers = sign_request_headers(
                self._identity.alipay_private_key, method="POST", path=notification.path,
                client_id=client_id, body=notification.body, time=request_time,
                key_version=self._args.key_version,
            )
            headers["Content-Type"] = "application/json; charset=UTF-8"
            started = time.perf_counter()
            try:
                async with self._session.post(self._identity.url + notification.path,
                                              data=notification.body, headers=headers) as response:
                    raw = await response.read()
                    latency = time.perf_counter() - started
                    status = response.status
                    answer_headers = response.headers
            except TimeoutError:
                answer = Answer(notification.provider, notification.notify_type, None, "-", "timeout",
                                time.perf_counter() - started, "n/a")
            except aiohttp.ClientError as exc:
                answer = Answer(notification.provider, notification.notify_type, None, "-",
                                type(exc).__name__, time.perf_counter() - started, "n/a")
            else:
                result_status, result_code = "-", "(unreadable body)"
                try:
                    result = json.loads(raw).get("result") or {}
                    result_status = str(result.get("resultStatus", "-"))
                    result_code = str(result.get("resultCode", "-"))
                except (ValueError, AttributeError):
                    pass
                signature = "n/a"
                if result_status == "S":
                    if self._identity.our_public_keys is None:
                        signature = "unchecked"
                    else:
                        valid = verify_signature_header(
                            self._identity.our_public_keys, answer_headers.get("Signature"), method="POST",
                            path=notification.path, client_id=answer_headers.get("Client-Id") or client_id,
                            time=answer_headers.get("Response-Time") or "", body=raw,
                        )
                        signature = "verified" if valid else "bad"
                answer = Answer(notification.provider, notification.notify_type, status, result_status,
                                result_code, latency, signature)
        self._tally.add(answer)
        self._advance(1)
        return answer

    def skip(self, count: int) -> None:
        """Counts ``count`` planned sends as done without sending them."""
        self._advance(count)

    async def send_all(self, notifications: list[Notification]) -> list[Answer]:
        """Sends at most ``--rate`` a second (evenly spaced), ``--concurrency`` at a time."""
        rate = self._args.rate
        started = time.monotonic()

        async def paced(index: int, notification: Notification) -> Answer:
            if rate > 0:
                delay = started + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            return await self.send(notification)

        return list(await asyncio.gather(*(paced(i, n) for i, n in enumerate(notifications))))


# --- scenarios ------------------------------------------------------------------------------------


@dataclass
class Plan:
    total: int  # notifications to send, for the progress bar
    run: Callable[[Sender], Awaitable[None]]
    authorizations: list[Authorization]


async def _wait_for_activations(identity: Identity, session: Any, fingerprints: set[str], gap: float) -> str:
    """Until the dev merchant endpoint has seen every activation; ``gap`` seconds when it cannot tell."""
    import aiohttp

    if not identity.merchant_events_url:
        await asyncio.sleep(gap)
        return "gap"
    deadline = time.monotonic() + ACTIVATION_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            async with session.get(identity.merchant_events_url) as response:
                events = await response.json() if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            events = None
        if events is None:
            await asyncio.sleep(gap)
            return "gap"
        seen = {e.get("accessTokenFingerprint") for e in events if e.get("type") == "authorization.activated"}
        if fingerprints <= seen:
            return "activated"
        await asyncio.sleep(0.2)
    return "timeout"


async def _revoke_through_api(identity: Identity, session: Any, fingerprint: str) -> str | None:
    """Revokes through the dev internal API (as a merchant's back office would); a note when that fails."""
    import aiohttp

    url = f"{identity.api_url}/v1/authorizations/{fingerprint}/revoke"
    headers = {"Authorization": f"Bearer {identity.api_key}", "Content-Type": "application/json"}
    body = json.dumps({"reason": "simulate lifecycle: the merchant ended the agreement"})
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status == 202:
                return None
            return f"revoking {fingerprint} through the API answered HTTP {response.status}"
    except (TimeoutError, aiohttp.ClientError) as exc:
        return f"revoking {fingerprint} through the API failed ({type(exc).__name__})"


async def _watch_lifecycle(identity: Identity, session: Any, expected: dict[str, tuple[str, ...]]) -> dict[
        str, list[str]]:
    """The event types the dev merchant endpoint received per authorization (named by its first
    fingerprint), until each has every expected type or the wait is over."""
    import aiohttp

    assert identity.merchant_events_url is not None
    deadline = time.monotonic() + LIFECYCLE_WAIT_SECONDS
    seen: dict[str, list[str]] = {}
    while True:
        try:
            async with session.get(identity.merchant_events_url) as response:
                events = await response.json() if response.status == 200 else []
        except (TimeoutError, aiohttp.ClientError, ValueError):
            events = []
        # An authorization's fingerprint changes with each refresh: follow it by its authorizationId.
        first_fingerprint = {e.get("authorizationId"): e.get("accessTokenFingerprint") for e in events
                             if e.get("type") == "authorization.activated" and e.get("accessTokenFingerprint") in expected}
        seen = {}
        for event in events:
            fingerprint = first_fingerprint.get(event.get("authorizationId"))
            if fingerprint is not None:
                seen.setdefault(fingerprint, []).append(str(event.get("type")))
        if all(set(types) <= set(seen.get(fp, [])) for fp, types in expected.items()) or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.5)


def build_plan(args: argparse.Namespace, providers: list[str], factory: NotificationFactory,
               identity: Identity, session: Any, notes: list[str],
               lifecycle_report: dict[str, list[str]] | None = None) -> Plan:
    from authnotify.domain.authorizations import access_token_fingerprint

    count = args.count
    scenario = args.scenario
    authorizations: list[Authorization] = []
    lifecycle_report = lifecycle_report if lifecycle_report is not None else {}

    def new(provider: str, from_auth_code: bool) -> Authorization:
        auth = factory.authorization(provider, from_auth_code=from_auth_code)
        authorizations.append(auth)
        return auth

    if scenario == "lifecycle":
        if factory.tokens_for_code is None:
            raise CommandError(
                "authnotify simulate: lifecycle needs the dev gateway's secret to know the tokens auth codes "
                f"become: run it where `authnotify dev` keeps {args.dev_dir}/, or use token-created")
        code_flows = [new(p, True) for _ in range(count) for p in providers]
        token_flows = [new(p, False) for _ in range(count) for p in providers]
        revoke_by_api = bool(identity.api_url and identity.api_key and identity.merchant_events_url)
        if not revoke_by_api:
            notes.append("no dev internal API or merchant endpoint here: the token flow is canceled with "
                         "TOKEN_CANCELED instead of a revocation, and the events are not checked")

        async def lifecycle(sender: Sender) -> None:
            await sender.send_all([factory.auth_code_created(a) for a in code_flows])
            await sender.send_all([factory.token_created(a, lifetime_seconds=(10, 30)) for a in token_flows])
            fingerprints = {access_token_fingerprint(a.access_token) for a in authorizations}
            waited = await _wait_for_activations(identity, session, fingerprints, args.gap)
            if waited == "timeout":
                notes.append(f"the merchant endpoint did not see every activation within "
                             f"{ACTIVATION_WAIT_SECONDS:.0f}s; going on anyway")
            if not revoke_by_api:
                await sender.send_all([factory.token_canceled(a) for a in token_flows])
                return
            for auth in token_flows:
                note = await _revoke_through_api(identity, session, access_token_fingerprint(auth.access_token))
                if note:
                    notes.append(note)
            expected: dict[str, tuple[str, ...]] = {
                access_token_fingerprint(a.access_token): CODE_FLOW_EVENTS for a in code_flows}
            expected |= {access_token_fingerprint(a.access_token): TOKEN_FLOW_EVENTS for a in token_flows}
            seen = await _watch_lifecycle(identity, session, expected)
            lifecycle_report.update(seen)
            missing = {fp: [t for t in expected[fp] if t not in seen.get(fp, [])] for fp in expected}
            for fingerprint, types in missing.items():
                if types:
                    notes.append(f"authorization {fingerprint}: no {', '.join(types)} within "
                                 f"{LIFECYCLE_WAIT_SECONDS:.0f}s")

        return Plan(2 * count * len(providers) + (0 if revoke_by_api else count * len(providers)), lifecycle,
                    authorizations)

    if scenario in ("authcode-created", "token-created", "token-canceled"):
        notify_type = scenario.upper().replace("-", "_")
        if notify_type == "AUTHCODE_CREATED" and factory.tokens_for_code is None:
            notes.append("no dev gateway secret here: access token fingerprints of auth codes are unknown")
        auths = [new(p, notify_type == "AUTHCODE_CREATED") for _ in range(count) for p in providers]

        async def single(sender: Sender) -> None:
            await sender.send_all([factory.of_type(notify_type, a) for a in auths])

        return Plan(len(auths), single, authorizations)

    from_code = args.notify_type == "AUTHCODE_CREATED"
    auths = [new(p, from_code) for _ in range(count) for p in providers]
    notifications = [factory.of_type(args.notify_type, a) for a in auths]
    if scenario == "duplicates":
        async def duplicates(sender: Sender) -> None:
            await sender.send_all([n for n in notifications for _ in range(args.repeat)])

        return Plan(len(notifications) * args.repeat, duplicates, authorizations)

    # retry-pattern: each notification follows the schedule on its own, all of them at once.
    async def retry_pattern(sender: Sender) -> None:
        async def follow(notification: Notification) -> None:
            for attempt, interval in enumerate(RETRY_SCHEDULE_SECONDS):
                await asyncio.sleep(interval / args.time_scale)
                answer = await sender.send(notification)
                if args.stop_on_success and answer.acknowledged:
                    sender.skip(len(RETRY_SCHEDULE_SECONDS) - attempt - 1)
                    return

        await asyncio.gather(*(follow(n) for n in notifications))

    return Plan(len(notifications) * len(RETRY_SCHEDULE_SECONDS), retry_pattern, authorizations)


# --- the summary ----------------------------------------------------------------------------------


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return sorted_values[index]


def summarize(args: argparse.Namespace, identity: Identity, tally: Tally, duration: float,
              authorizations: list[Authorization], notes: list[str],
              lifecycle_report: dict[str, list[str]] | None = None) -> dict[str, Any]:
    from authnotify.domain.authorizations import access_token_fingerprint

    answers = tally.answers
    grouped = Counter((a.http_status, a.result_status, a.result_code) for a in answers)
    latencies = sorted(a.latency_seconds * 1000 for a in answers if a.http_status is not None)
    signatures = Counter(a.signature for a in answers if a.signature != "n/a")
    acknowledged = sum(a.acknowledged for a in answers)
    sent = Counter(f"{a.provider}.{a.notify_type}" for a in answers)
    events = lifecycle_report or {}
    lifecycle = [
        {"provider": a.provider, "flow": "auth code" if a.auth_code else "token",
         "accessTokenFingerprint": access_token_fingerprint(a.access_token),
         "events": events.get(access_token_fingerprint(a.access_token), [])}
        for a in authorizations
    ] if lifecycle_report else None
    lifecycle_ok = lifecycle is None or all(
        set(CODE_FLOW_EVENTS if item["flow"] == "auth code" else TOKEN_FLOW_EVENTS) <= set(item["events"])
        for item in lifecycle)
    return {
        "scenario": args.scenario,
        "url": identity.url,
        "sent": len(answers),
        "acknowledged": acknowledged,
        "notAcknowledged": len(answers) - acknowledged,
        "ok": bool(answers) and acknowledged == len(answers) and lifecycle_ok,
        "durationSeconds": round(duration, 3),
        "ratePerSecond": round(len(answers) / duration, 1) if duration > 0 else None,
        "byNotification": dict(sorted(sent.items())),
        "answers": [
            {"http": http, "resultStatus": status, "resultCode": code, "count": n}
            for (http, status, code), n in sorted(grouped.items(), key=lambda item: -item[1])
        ],
        "latencyMs": {
            "p50": round(_percentile(latencies, 0.50), 2),
            "p99": round(_percentile(latencies, 0.99), 2),
            "max": round(latencies[-1], 2) if latencies else 0.0,
        },
        "signatures": {"verified": signatures["verified"], "bad": signatures["bad"],
                       "unchecked": signatures["unchecked"]},
        "authorizations": [
            {"provider": a.provider,
             "accessTokenFingerprint": access_token_fingerprint(a.access_token) if a.access_token else None,
             "flow": "auth code" if a.auth_code else "token"}
            for a in authorizations
        ],
        "lifecycle": lifecycle,
        "notes": notes,
    }


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]authnotify simulate {summary['scenario']}[/]: {summary['sent']} notifications to "
                  f"{summary['url']} in {summary['durationSeconds']:.2f}s"
                  + (f" ({summary['ratePerSecond']}/s)" if summary["ratePerSecond"] else ""))
    table = Table(title="answers", title_justify="left")
    table.add_column("HTTP", justify="right")
    table.add_column("resultStatus")
    table.add_column("resultCode")
    table.add_column("count", justify="right")
    for row in summary["answers"]:
        style = "green" if row["http"] == 200 and row["resultStatus"] == "S" else "red"
        table.add_row(str(row["http"] if row["http"] is not None else "-"), row["resultStatus"],
                      row["resultCode"], str(row["count"]), style=style)
    console.print(table)
    latency = summary["latencyMs"]
    console.print(f"latency ms: p50 {latency['p50']}  p99 {latency['p99']}  max {latency['max']}")
    signatures = summary["signatures"]
    console.print(f"answer signatures: {signatures['verified']} verified, {signatures['bad']} bad"
                  + (f", {signatures['unchecked']} unchecked (no public key)" if signatures["unchecked"] else ""))
    if summary.get("lifecycle"):
        lifecycle = Table(title="lifecycle (events the merchant received)", title_justify="left")
        for column in ("provider", "flow", "accessTokenFingerprint", "events"):
            lifecycle.add_column(column)
        for item in summary["lifecycle"]:
            lifecycle.add_row(item["provider"], item["flow"], item["accessTokenFingerprint"],
                              ", ".join(t.removeprefix("authorization.") for t in item["events"]) or "-")
        console.print(lifecycle)
    for note in summary["notes"]:
        console.print(f"note: {note}")
    if summary["authorizations"] and len(summary["authorizations"]) <= 8:
        listed = ", ".join(f"{a['provider']} {a['accessTokenFingerprint']}" for a in summary["authorizations"]
                           if a["accessTokenFingerprint"])
        if listed:
            console.print(f"authorizations (accessTokenFingerprint): {listed}")
    if summary["ok"]:
        console.print(f"[green]all {summary['sent']} acknowledged (S, signature verified)"
                      + (", every lifecycle event received" if summary.get("lifecycle") else "") + "[/]")
    else:
        problem = (f"{summary['notAcknowledged']} of {summary['sent']} not acknowledged" if summary["notAcknowledged"]
                   else "lifecycle events missing (see the notes)")
        console.print(f"[red]{problem}[/]")


# --- the command ----------------------------------------------------------------------------------


async def _check_reachable(session: Any, url: str) -> None:
    import aiohttp

    try:
        async with session.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as response:
            await response.read()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
        raise CommandError(
            f"authnotify simulate: ingress unreachable at {url} ({reason}): start `authnotify dev` "
            "(or `make dev`), or pass --url") from None


async def simulate(args: argparse.Namespace) -> int:
    import aiohttp
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    providers = ["ams", "aps"] if args.provider == "both" else [args.provider]
    identity = resolve_identity(args, providers)
    factory = NotificationFactory(identity.tokens_for_code)
    tally = Tally()
    notes: list[str] = []
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _check_reachable(session, identity.url)
        lifecycle_report: dict[str, list[str]] = {}
        plan = build_plan(args, providers, factory, identity, session, notes, lifecycle_report)
        stderr = Console(stderr=True)
        show_progress = not args.no_progress and stderr.is_terminal
        progress = Progress(TextColumn(f"simulate {args.scenario}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=stderr, transient=True, disable=not show_progress)
        with progress:
            task = progress.add_task("send", total=plan.total)
            sender = Sender(identity, args, session, tally, lambda n: progress.advance(task, n))
            started = time.perf_counter()
            await plan.run(sender)
            duration = time.perf_counter() - started
    summary = summarize(args, identity, tally, duration, plan.authorizations, notes, lifecycle_report)
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    else:
        print_summary(summary)
    return EXIT_OK if summary["ok"] else EXIT_FAILURE


async def run(args: argparse.Namespace) -> int:
    try:
        return await simulate(args)
    except CommandError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
