"""Tokens at rest: the one place they are encrypted and decrypted, with AUTHNOTIFY_TOKEN_KEYS.

Fernet (AES-128-CBC with HMAC-SHA256) through ``MultiFernet``: the first key encrypts, every key decrypts,
so a new key can be put first and the old ones dropped once :meth:`TokenCipher.rotate` has rewritten the
stored tokens (``authnotify reencrypt-tokens``).
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from authnotify.config import ENV_PREFIX, TokenKeys
from authnotify.errors import ConfigError, StoreError

_NO_KEY = f"{ENV_PREFIX}TOKEN_KEYS: required wherever tokens are stored"
_WRONG_KEYS = f"a stored token does not decrypt with any key of {ENV_PREFIX}TOKEN_KEYS"


class TokenCipher:
    def __init__(self, token_keys: TokenKeys | None) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in token_keys.keys]) if token_keys else None

    @property
    def has_keys(self) -> bool:
        return self._fernet is not None

    def _keys(self) -> MultiFernet:
        if self._fernet is None:
            raise ConfigError(_NO_KEY)
        return self._fernet

    def require_keys(self) -> None:
        """ConfigError now, before any work, when there is no key to encrypt with."""
        self._keys()

    def encrypt(self, token: str) -> bytes:
        return self._keys().encrypt(token.encode())

    def encrypt_optional(self, token: str | None) -> bytes | None:
        return self.encrypt(token) if token else None

    def decrypt(self, ciphertext: bytes) -> str:
        try:
            return self._keys().decrypt(ciphertext).decode()
        except InvalidToken:
            raise StoreError(_WRONG_KEYS) from None

    def rotate(self, ciphertext: bytes | None) -> bytes | None:
        """The same token under the first key."""
        if ciphertext is None:
            return None
        try:
            return self._keys().rotate(ciphertext)
        except InvalidToken:
            raise StoreError(_WRONG_KEYS) from None

    def __repr__(self) -> str:
        return "TokenCipher(<redacted>)"
