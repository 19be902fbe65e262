"""Why a notification's signature does not verify: one verdict naming the part that fails.

The ingress answers ``INVALID_SIGNATURE`` without saying more (a caller who is not Alipay learns nothing);
this module says more, for an operator holding a captured request (``authnotify verify-signature``). It
checks in the ingress's order and names the first part that fails:

* ``client id``: the ``Client-Id`` header is missing or is not ours for this provider;
* ``request time``: ``Request-Time`` is missing, unreadable, or outside the accepted window;
* ``key version``: no configured Alipay public key serves the Signature header's ``keyVersion``;
* ``path``: the signature verifies, but over another path than the one the ingress checks (a proxy that adds
  or strips a prefix: ``AUTHNOTIFY_NOTIFY_PATH_PREFIX``);
* ``signature over the body``: the signature does not verify over these exact bytes (the body or the
  Request-Time was changed after signing, or the key is not the one Alipay signs with).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from authnotify.alipay.signature import (
    REQUEST_TIME_FUTURE_SECONDS,
    SignatureHeaderError,
    parse_signature_header,
    request_time_in_window,
    signed_content,
    verify_signature,
)
from authnotify.config.keys import ANY_KEY_VERSION, PublicKeyRing

Part = Literal["client id", "request time", "key version", "path", "signature over the body"]


@dataclass(frozen=True)
class Verdict:
    valid: bool
    part: Part | None = None  # what fails, when not valid
    detail: str = ""

    def line(self) -> str:
        return "valid" if self.valid else f"{self.part}: {self.detail}"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h"


def explain_notification_signature(
    *,
    keys: PublicKeyRing,
    client_id: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_seconds: float,
    other_paths: Sequence[str] = (),
    now: float | None = None,
) -> Verdict:
    """The verdict on one captured request, ``path`` being the path the ingress verifies against.

    ``other_paths``: where the request may really have been signed (the path it was captured at, the path
    without or with the configured prefix); one that verifies makes the verdict ``path``.
    """
    sent_client_id = _header(headers, "Client-Id")
    if sent_client_id is None:
        return Verdict(False, "client id", "the request has no Client-Id header")
    if sent_client_id != client_id:
        return Verdict(False, "client id", f"the request's Client-Id is {sent_client_id!r}, ours is {client_id!r}")

    request_time = _header(headers, "Request-Time")
    if not request_time:
        return Verdict(False, "request time", "the request has no Request-Time header")
    if not request_time_in_window(request_time, time.time() if now is None else now, tolerance_seconds):
        return Verdict(False, "request time", (
            f"{request_time!r} is not a time the ingress accepts (ISO 8601 or epoch milliseconds, at most "
            f"{_hours(tolerance_seconds)} old and {REQUEST_TIME_FUTURE_SECONDS / 60:g} min ahead)"))

    signature = _header(headers, "Signature")
    if not signature:
        return Verdict(False, "signature over the body", "the request has no Signature header")
    try:
        parsed = parse_signature_header(signature)
    except SignatureHeaderError as exc:
        return Verdict(False, "signature over the body", f"the Signature header is malformed ({exc})")
    if keys.for_version(parsed.key_version) is None:
        configured = ", ".join(sorted(v for v in keys.keys if v != ANY_KEY_VERSION)) or "none"
        return Verdict(False, "key version", (
            f"keyVersion {parsed.key_version!r} has no Alipay public key configured (configured: {configured})"))

    def verifies_over(candidate: str) -> bool:
        return verify_signature(keys, parsed, signed_content("POST", candidate, client_id, request_time, body))

    if verifies_over(path):
        return Verdict(True)
    for candidate in dict.fromkeys(other_paths):
        if candidate != path and verifies_over(candidate):
            return Verdict(False, "path", (
                f"the signature verifies over {candidate}, but the ingress verifies over {path}: Alipay signs the "
                "path it calls, so set AUTHNOTIFY_NOTIFY_PATH_PREFIX to what a proxy puts in front of the notify "
                "path (or remove it)"))
    return Verdict(False, "signature over the body", (
        f"does not verify over POST {path} with Alipay's public key for keyVersion {parsed.key_version}: the "
        "body or Request-Time was changed after signing (a proxy re-encoding JSON, say), or the key is not the "
        "one Alipay signs with"))
