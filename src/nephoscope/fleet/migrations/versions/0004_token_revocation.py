"""Token revocation, last use, and an audit of token changes.

Revision ID: 0004
Revises: 0003

Every token of a 0003 database stays valid (`revoked_at` NULL) and its secret keeps working: secrets were
stored as their SHA-256 from 0001 on, so nothing is rehashed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add `tokens.revoked_at` and `tokens.last_used` (NULL: not revoked, not used since) and `token_audit`."""
    op.add_column("tokens", sa.Column("revoked_at", sa.Float, nullable=True))
    op.add_column("tokens", sa.Column("last_used", sa.Float, nullable=True))
    op.create_table("token_audit", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("token_id", sa.Integer, sa.ForeignKey("tokens.id"), nullable=False),
                    sa.Column("at", sa.Float, nullable=False), sa.Column("action", sa.String(32), nullable=False),
                    sa.Column("actor_token_id", sa.Integer, sa.ForeignKey("tokens.id"), nullable=True),
                    sa.Column("actor", sa.String(300), nullable=False),
                    sa.Column("forced", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_index("token_audit_token", "token_audit", ["token_id"])


def downgrade() -> None:
    """Drop `token_audit`, `tokens.last_used` and `tokens.revoked_at`; revoked tokens are deleted first (a 0003
    database has no way to refuse them)."""
    op.drop_index("token_audit_token", table_name="token_audit")
    op.drop_table("token_audit")
    op.execute("DELETE FROM tokens WHERE revoked_at IS NOT NULL")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("last_used")
        batch.drop_column("revoked_at")
