"""The store: authorizations (tokens encrypted) and exchanged auth codes (hashed), in SQLite or PostgreSQL.

Layer 3: imports the layers below (errors, config, observability, domain), never messaging, the services
or the command line. :class:`AuthorizationStore` is the interface; :func:`open_store` opens the SQL one.
"""

from authnotify.errors import StoreError
from authnotify.store.repository import AuthorizationStore
from authnotify.store.sql import SqlStore

open_store = SqlStore.connect

__all__ = ["AuthorizationStore", "SqlStore", "StoreError", "open_store"]
