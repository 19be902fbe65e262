"""Database trouble, phrased safely: one line, no SQL parameters, no password."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from authnotify.errors import StoreError


def describe(exc: BaseException) -> str:
    """``Type: first line`` of the driver's own error: SQLAlchemy's text would carry the parameters."""
    inner: BaseException = exc
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        inner = exc.orig
    text = str(inner).strip().splitlines()[0][:200] if str(inner).strip() else ""
    if isinstance(exc, SQLAlchemyError) and inner is exc:
        # SQLAlchemy's own messages append "[SQL: ...]" and a background link on later lines only.
        text = text.split(" [SQL:")[0]
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


DATABASE_ERRORS = (SQLAlchemyError, OSError, asyncio.TimeoutError, ConnectionError)


@contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Turns a driver's error into a :class:`StoreError` that says what could not be done."""
    try:
        yield
    except StoreError:
        raise
    except DATABASE_ERRORS as exc:
        raise StoreError(f"{action}: {describe(exc)}") from None
