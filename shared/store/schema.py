"""The schema: authorizations, every access token each held, code exchanges and lifecycle commands.

An authorization is keyed by its ``authorization_id``; its current access token's fingerprint is unique per
provider, and ``authorization_tokens`` maps every fingerprint it ever held (by provider) back to it. That
table is also what decides "new or known" when tokens are recorded: its primary key is the one place two
writers of the same token meet. Tokens are stored only as Fernet ciphertext; auth codes only as a SHA-256
hash. Text columns are
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
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from authnotify.domain.authorizations import AUTHORIZATION_ID_MAX_LENGTH, STATUSES

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
    """One authorization at one provider. A cancellation that arrives first leaves a tombstone row (status
    canceled, ``activated_at`` null) that a late TOKEN_CREATED only fills in.

    The lifecycle columns (docs/lifecycle.md): ``refresh_requested_at`` marks a refresh request in flight,
    ``refresh_claimed_until`` the token-refresh worker holding it, ``expiry_warned_for`` the expiry time an
    ``authorization.expiring`` was sent for, ``scheduler_claimed_at`` a scheduler publishing its due work.
    """

    __tablename__ = "authorizations"

    authorization_id: Mapped[str] = mapped_column(String(AUTHORIZATION_ID_MAX_LENGTH), primary_key=True)
    # Fingerprint first: `show KEY` looks authorizations up by fingerprint alone.
    access_token_fingerprint: Mapped[str] = mapped_column(String(16))
    provider: Mapped[str] = mapped_column(String(8))
    first_access_token_fingerprint: Mapped[str] = mapped_column(String(16))
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
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expiry_reason: Mapped[str | None] = mapped_column(String)
    refresh_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    refresh_claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expiry_warned_for: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expiry_warned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    scheduler_claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("access_token_fingerprint", "provider"),
        CheckConstraint("status IN (" + ", ".join(f"'{status}'" for status in STATUSES) + ")", name="status"),
        Index(None, "reference_agreement_id"),
        Index(None, "reference_merchant_id"),
        Index(None, "auth_client_id"),
        Index(None, "status", "access_token_expires_at"),
        Index(None, "status", "refresh_token_expires_at"),
        Index(None, "created_at", "authorization_id"),  # list order and its cursor
    )


class AuthorizationToken(Base):
    """An access token an authorization held, by fingerprint: the first (generation 0), then each refresh."""

    __tablename__ = "authorization_tokens"

    access_token_fingerprint: Mapped[str] = mapped_column(String(16), primary_key=True)
    provider: Mapped[str] = mapped_column(String(8), primary_key=True)
    # Deferred: a new authorization's token row is written first (it decides "new"), its authorization after.
    authorization_id: Mapped[str] = mapped_column(
        String(AUTHORIZATION_ID_MAX_LENGTH),
        ForeignKey("authorizations.authorization_id", deferrable=True, initially="DEFERRED"),
        index=True,
    )
    generation: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)


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
            ["authorization_tokens.access_token_fingerprint", "authorization_tokens.provider"],
        ),
    )


class Command(Base):
    """The outcome of a lifecycle command (a revocation), for ``--wait`` and the API."""

    __tablename__ = "commands"

    command_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    authorization_id: Mapped[str | None] = mapped_column(String(AUTHORIZATION_ID_MAX_LENGTH))
    status: Mapped[str] = mapped_column(String(16))  # succeeded, failed, retrying
    detail: Mapped[str | None] = mapped_column(String)
    attempts: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


authorizations: Table = Authorization.__table__  # type: ignore[assignment]
authorization_tokens: Table = AuthorizationToken.__table__  # type: ignore[assignment]
code_exchanges: Table = CodeExchange.__table__  # type: ignore[assignment]
commands: Table = Command.__table__  # type: ignore[assignment]
