"""The RSA keys the Alipay portals hand out, as configuration values, whatever shape they arrive in.

A key value is PEM text, bare base64 DER (PKCS#8 or PKCS#1 private keys, X.509 SubjectPublicKeyInfo or
PKCS#1 public keys), or ``@/path/to/file`` holding either. An Alipay public key value may also be a JSON
object ``{"<keyVersion>": "<key>", ...}`` so keys can rotate.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey


class InvalidKeyError(ValueError):
    """A key value that cannot be turned into an RSA key; the message never contains the key."""


class PrivateKey:
    """An RSA private key that never shows itself in a repr or an error."""

    __slots__ = ("key",)

    def __init__(self, key: RSAPrivateKey) -> None:
        self.key = key

    def __repr__(self) -> str:
        return "PrivateKey(<redacted>)"


ANY_KEY_VERSION = "*"


def _read_value(value: str) -> str:
    value = value.strip()
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InvalidKeyError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    return value


def _bare_base64(text: str) -> bytes:
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyError("not PEM and not valid base64") from None


def load_private_key(value: str) -> RSAPrivateKey:
    text = _read_value(value)
    if not text:
        raise InvalidKeyError("empty key")
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            # load_der_private_key detects PKCS#8 and PKCS#1 (traditional) DER alike.
            key = serialization.load_der_private_key(_bare_base64(text), password=None)
    except InvalidKeyError:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidKeyError(f"not a readable private key ({type(exc).__name__})") from None
    if not isinstance(key, RSAPrivateKey):
        raise InvalidKeyError("not an RSA private key")
    return key


def load_public_key(value: str) -> RSAPublicKey:
    text = _read_value(value)
    if not text:
        raise InvalidKeyError("empty key")
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(_bare_base64(text))
    except InvalidKeyError:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidKeyError(f"not a readable public key ({type(exc).__name__})") from None
    if not isinstance(key, RSAPublicKey):
        raise InvalidKeyError("not an RSA public key")
    return key


@dataclass(frozen=True)
class PublicKeyRing:
    """Alipay's public keys by keyVersion; ``ANY_KEY_VERSION`` serves every version."""

    keys: Mapping[str, RSAPublicKey]

    def for_version(self, key_version: str | None) -> RSAPublicKey | None:
        if key_version is not None and key_version in self.keys:
            return self.keys[key_version]
        return self.keys.get(ANY_KEY_VERSION)

    def __repr__(self) -> str:
        return f"PublicKeyRing(versions={sorted(self.keys)})"


def load_public_key_ring(value: str) -> PublicKeyRing:
    text = _read_value(value)
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidKeyError(f"keyVersion map is not valid JSON ({exc.msg})") from None
        if not isinstance(mapping, dict) or not mapping:
            raise InvalidKeyError("keyVersion map must be a non-empty JSON object")
        keys: dict[str, RSAPublicKey] = {}
        for version, key_value in mapping.items():
            if not isinstance(key_value, str):
                raise InvalidKeyError(f"keyVersion {version}: key must be a string")
            try:
                keys[str(version)] = load_public_key(key_value)
            except InvalidKeyError as exc:
                raise InvalidKeyError(f"keyVersion {version}: {exc}") from None
        return PublicKeyRing(keys)
    return PublicKeyRing({ANY_KEY_VERSION: load_public_key(text)})


def private_key_pem(key: RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_key_pem(key: RSAPublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
