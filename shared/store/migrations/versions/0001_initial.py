"""Authorizations and code exchanges.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "authorizations",
        sa.Column("access_token_fingerprint", sa.String(16), nullable=False),
        sa.Column("provider", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("access_token_encrypted", sa.LargeBinary(), nullable=True),
        sa.Column("refresh_token_encrypted", sa.LargeBinary(), nullable=True),
        sa.Column("access_token_expires_at", timestamp, nullable=True),
        sa.Column("refresh_token_expires_at", timestamp, nullable=True),
        sa.Column("auth_client_id", sa.String(), nullable=True),
        sa.Column("reference_merchant_id", sa.String(), nullable=True),
        sa.Column("reference_agreement_id", sa.String(), nullable=True),
        sa.Column("customer_id", sa.String(), nullable=True),
        sa.Column("user_login_id", sa.String(), nullable=True),
        sa.Column("auth_state", sa.String(), nullable=True),
        sa.Column("scopes", sa.JSON(), nullable=True),
        sa.Column("token_cancel_source", sa.String(), nullable=True),
        sa.Column("cancel_reason", sa.String(), nullable=True),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.Column("activated_at", timestamp, nullable=True),
        sa.Column("canceled_at", timestamp, nullable=True),
        sa.PrimaryKeyConstraint("access_token_fingerprint", "provider", name="pk_authorizations"),
        sa.CheckConstraint("status IN ('active', 'canceled')", name="status"),
    )
    op.create_index("ix_authorizations_reference_agreement_id", "authorizations", ["reference_agreement_id"])
    op.create_index("ix_authorizations_reference_merchant_id", "authorizations", ["reference_merchant_id"])
    op.create_index("ix_authorizations_auth_client_id", "authorizations", ["auth_client_id"])
    op.create_index(
        "ix_authorizations_status_access_token_expires_at", "authorizations", ["status", "access_token_expires_at"]
    )
    op.create_index(
        "ix_authorizations_status_refresh_token_expires_at", "authorizations", ["status", "refresh_token_expires_at"]
    )
    op.create_table(
        "code_exchanges",
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(8), nullable=False),
        sa.Column("access_token_fingerprint", sa.String(16), nullable=False),
        sa.Column("exchanged_at", timestamp, nullable=False),
        sa.PrimaryKeyConstraint("code_hash", name="pk_code_exchanges"),
        sa.ForeignKeyConstraint(
            ["access_token_fingerprint", "provider"],
            ["authorizations.access_token_fingerprint", "authorizations.provider"],
            name="fk_code_exchanges_authorizations",
        ),
    )


def downgrade() -> None:
    op.drop_table("code_exchanges")
    op.drop_table("authorizations")
