"""Persistent state: authorizations (tokens encrypted) and exchanged auth codes (hashed), SQLite or PostgreSQL."""

from authnotify.store.errors import StoreError
from authnotify.store.store import Cancellation, Recorded, Store, TokenGrant, authorization_data, code_hash

__all__ = ["Cancellation", "Recorded", "Store", "StoreError", "TokenGrant", "authorization_data", "code_hash"]
