"""The Alipay RSA256 signature scheme, shared by AMS and Alipay+, in both directions.

Signed content: ``<METHOD> <path>\\n<Client-Id>.<Request-Time or Response-Time>.<raw body>``.
Signature: RSASSA-PKCS1-v1_5 over SHA-256, base64, URL-encoded, carried in
``Signature: algorithm=RSA256,keyVersion=N,signature=S``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from authnotify.config.keys import PublicKeyRing

ALGORITHM = "RSA256"


class SignatureHeaderError(ValueError):
    """The Signature header is missing a part or is not of the documented form."""


@dataclass(frozen=True)
class SignatureHeader:
    algorithm: str
    key_version: str | None
    signature: bytes  # raw RSA signature bytes


def signed_content(method: str, path: str, client_id: str, time: str, body: bytes) -> bytes:
    # surrogateescape gives back the raw bytes of a header that was not UTF-8 (aiohttp decodes header
    # values that way): such a request then fails verification instead of raising.
    return f"{method} {path}\n{client_id}.{time}.".encode("utf-8", "surrogateescape") + body


def sign_content(private_key: RSAPrivateKey, content: bytes) -> str:
    """Returns the URL-encoded base64 signature, as it goes into the header."""
    raw = private_key.sign(content, padding.PKCS1v15(), hashes.SHA256())
    return quote(base64.b64encode(raw).decode("ascii"), safe="")


def format_signature_header(signature: str, key_version: str = "1") -> str:
    return f"algorithm={ALGORITHM},keyVersion={key_version},signature={signature}"


_CANONICAL_PREFIX = f"algorithm={ALGORITHM},keyVersion="
_SIGNATURE_PART = ",signature="
# A base64 signature URL-encoded (sign_content's quote(..., safe="")) has only these escapes.
_BASE64_ESCAPES = (("%2B", "+"), ("%2F", "/"), ("%3D", "="))


def _decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureHeaderError("signature is not base64") from None


def parse_signature_header(value: str) -> SignatureHeader:
    """Lenient: spaces around parts, any case of the part names, encoded or bare base64.

    The header exactly as Alipay writes it (``algorithm=RSA256,keyVersion=N,signature=<URL-encoded
    base64>``) takes a fast path: the general parser and urllib's unquote cost about 10 µs a request,
    which the ingress pays on every notification.
    """
    if value.startswith(_CANONICAL_PREFIX):
        version, found, encoded = value[len(_CANONICAL_PREFIX):].partition(_SIGNATURE_PART)
        if found and version.isdigit() and encoded and "," not in encoded and " " not in encoded:
            for escaped, plain in _BASE64_ESCAPES:
                encoded = encoded.replace(escaped, plain)
            if "%" not in encoded:
                return SignatureHeader(ALGORITHM, version, _decode_base64(encoded))
    parts: dict[str, str] = {}
    for part in value.split(","):
        name, sep, part_value = part.strip().partition("=")
        if not sep:
            raise SignatureHeaderError(f"malformed part {name[:32]!r}")
        parts[name.strip().lower()] = part_value.strip()
    algorithm = parts.get("algorithm")
    if algorithm is None or algorithm.upper() != ALGORITHM:
        raise SignatureHeaderError("algorithm must be RSA256")
    signature_part = parts.get("signature")
    if not signature_part:
        raise SignatureHeaderError("no signature part")
    raw = _decode_base64(unquote(signature_part) if "%" in signature_part else signature_part)
    return SignatureHeader(algorithm=ALGORITHM, key_version=parts.get("keyversion"), signature=raw)


# Stateless parameter objects: made once rather than on every verification.
_PADDING = padding.PKCS1v15()
_HASH = hashes.SHA256()


def verify_signature(keys: PublicKeyRing, header: SignatureHeader, content: bytes) -> bool:
    public_key = keys.for_version(header.key_version)
    if public_key is None:
        return False
    try:
        public_key.verify(header.signature, content, _PADDING, _HASH)
    except InvalidSignature:
        return False
    return True


def verify_signature_header(
    keys: PublicKeyRing,
    header_value: str | None,
    *,
    method: str,
    path: str,
    client_id: str,
    time: str,
    body: bytes,
) -> bool:
    """True when ``header_value`` is a valid Alipay signature of this request or response."""
    if not header_value:
        return False
    try:
        header = parse_signature_header(header_value)
    except SignatureHeaderError:
        return False
    return verify_signature(keys, header, signed_content(method, path, client_id, time, body))


# A naive ISO 8601 time names no offset: it is read under every offset in use, from UTC-12:00 to UTC+14:00.
_EARLIEST_OFFSET_SECONDS = -12 * 3600
_LATEST_OFFSET_SECONDS = 14 * 3600
REQUEST_TIME_FUTURE_SECONDS = 600.0  # clocks drift: a Request-Time up to 10 minutes ahead is accepted


def request_time_span(text: str) -> tuple[float, float] | None:
    """The earliest and latest moment (epoch seconds) a Request-Time header can mean, or None when it cannot
    be read. Both forms Alipay's SDKs send: ISO 8601 (``2026-11-23T18:00:00+08:00``, ``...Z``, with or
    without fractions) and epoch milliseconds (``1795435200000``)."""
    text = text.strip()
    if not text or len(text) > 40:
        return None
    if text.isdigit():
        moment = int(text) / 1000
        return moment, moment
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        moment = parsed.timestamp()
        return moment, moment
    as_utc = parsed.replace(tzinfo=UTC).timestamp()
    return as_utc - _LATEST_OFFSET_SECONDS, as_utc - _EARLIEST_OFFSET_SECONDS


def request_time_in_window(text: str, now: float, tolerance_seconds: float) -> bool:
    """True when the Request-Time can be read and lies between ``tolerance_seconds`` before ``now`` and
    :data:`REQUEST_TIME_FUTURE_SECONDS` after it: a captured request cannot be replayed for ever."""
    span = request_time_span(text)
    if span is None:
        return False
    earliest, latest = span
    return latest >= now - tolerance_seconds and earliest <= now + REQUEST_TIME_FUTURE_SECONDS


def signature_time(now: datetime | None = None) -> str:
    """An ISO 8601 Request-Time/Response-Time with an explicit offset, second precision."""
    moment = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    return moment.isoformat()


def sign_request_headers(
    private_key: RSAPrivateKey,
    *,
    method: str,
    path: str,
    client_id: str,
    body: bytes,
    time: str | None = None,
    time_header: str = "Request-Time",
    key_version: str = "1",
) -> dict[str, str]:
    """Client-Id, Request-Time (or Response-Time) and Signature headers for a body we send."""
    time = time or signature_time()
    signature = sign_content(private_key, signed_content(method, path, client_id, time, body))
    return {
        "Client-Id": client_id,
        time_header: time,
        "Signature": format_signature_header(signature, key_version),
    }
