"""The schema: authorizations (keyed by provider and access-token fingerprint) and code exchanges.

Tokens are stored only as Fernet ciphertext; auth codes only as a SHA-256 hash. Text columns are
unbounded: the notification models enforce the providers' lengths, and a too-long value must never turn
into a database error that is retried forever. Every moment is a
timezone-aware UTC timestamp (:class:`UTCDateTime` keeps that true on SQLite, which has no time zones).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKeyConstraint,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from authnotify.domain.authorizations import STATUS_ACTIVE, STATUS_CANCELED

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}



class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        # SQLite stores the wall time as text: a naive UTC value keeps comparisons correct.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Authorization(Base):
    """One authorization: an access token at one provider. A cancellation that arrives first leaves a
    tombstone row (status canceled, ``activated_at`` null) that a late TOKEN_CREATED only fills in."""

    __tablename__ = "authorizations"

    # Fingerprint first: `show KEY` looks authorizations up by fingerprint alone.
    access_token_fingerprint: Mapped[str] = mapped_column(String(16), primary_key=True)
    provider: Mapped[str] = mapped_column(String(8), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    access_token_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    refresh_token_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    access_token_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    refresh_token_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    auth_client_id: Mapped[str | None] = mapped_column(String)
    reference_merchant_id: Mapped[str | None] = mapped_column(String)
    reference_agreement_id: Mapped[str | None] = mapped_column(String)
    customer_id: Mapped[str | None] = mapped_column(String)
    user_login_id: Mapped[str | None] = mapped_column(String)
    auth_state: Mapped[str | None] = mapped_column(String)
    scopes: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    token_cancel_source: Mapped[str | None] = mapped_column(String)
    cancel_reason: Mapped[str | None] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint(f"status IN ('{STATUS_ACTIVE}', '{STATUS_CANCELED}')", name="status"),
        Index(None, "reference_agreement_id"),
        Index(None, "reference_merchant_id"),
        Index(None, "auth_client_id"),
        Index(None, "status", "access_token_expires_at"),
        Index(None, "status", "refresh_token_expires_at"),
    )


class CodeExchange(Base):
    """An auth code that was exchanged for tokens, named by SHA-256 of provider and code only."""

    __tablename__ = "code_exchanges"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider: Mapped[str] = mapped_column(String(8))
    access_token_fingerprint: Mapped[str] = mapped_column(String(16))
    exchanged_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        ForeignKeyConstraint(
            ["access_token_fingerprint", "provider"],
            ["authorizations.access_token_fingerprint", "authorizations.provider"],
        ),
    )


authorizations: Table = Authorization.__table__  # type: ignore[assignment]
code_exchanges: Table = CodeExchange.__table__  # type: ignore[assignment]
